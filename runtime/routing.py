"""The routing stage in torch: ``route(...)`` decisions for one batch item, on Q/K's device.

Same decisions as the numpy oracle :mod:`attnlang.routing` (tested equal), computed in
O(N·D + groups × blocks): pooled means by ``index_add_`` (fp32), scores by one batched matmul,
selection by a stable sort over each group's blocks (or the head's pairs with ``scope = head``).
Eligibility is static and shared with the oracle (cached per pattern). Results come back as
numpy arrays, which is what the planner and the IR read. Nothing here is differentiated.

    >>> import torch
    >>> from attnlang.pattern import Pattern, route
    >>> p = Pattern.create(route(8, top=1), tokens=32)
    >>> c = pattern_content(p, torch.randn(2, 32, 16), torch.randn(1, 32, 16), 0.25)
    >>> c[p.attend].shape
    (2, 32, 4)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnlang.pattern import Layout, Pattern, Route
from attnlang.routing import block_ids, eligibility, eligibility_permuted, group_ids, routes


def _segment_mean(x: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of ``x [H, N, D]`` over tokens sharing an id (``ids [N]``): fp32 ``[H, count, D]``."""
    H, _, D = x.shape
    out = torch.zeros((H, count, D), dtype=torch.float32, device=x.device).index_add_(1, ids, x.float())
    num = torch.bincount(ids, minlength=count).clamp_min(1).to(torch.float32)
    return out / num[None, :, None]


def importance_perm(route: Route, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """PBS-Attn key order ``[Hq, N]`` (position -> key), as :func:`attnlang.routing.importance_perm`."""
    Hq, n, _ = q.shape
    kk = k.float().repeat_interleave(Hq // k.shape[0], dim=0)
    last = q[:, max(0, n - route.block[0]):].float()
    imp = torch.softmax(torch.matmul(last, kk.transpose(1, 2)) * scale, dim=-1).mean(dim=1)
    S = route.permute
    whole = (n // S) * S
    perm = torch.arange(n, device=q.device).expand(Hq, n).clone()
    order = torch.sort(-imp[:, :whole].reshape(Hq, -1, S), dim=-1, stable=True).indices
    perm[:, :whole] = (order + torch.arange(0, whole, S, device=q.device)[None, :, None]).reshape(Hq, whole)
    return perm


def _select_rows(s: torch.Tensor, e: torch.Tensor, top: int | None, tau: float | None) -> torch.Tensor:
    s64 = s.double()
    order = torch.sort(torch.where(e, -s64, torch.inf), dim=-1, stable=True).indices
    n_el = e.sum(-1)
    if top is not None:
        count = n_el.clamp_max(top)
    else:
        z = torch.where(e, s64, -torch.inf)
        m = z.amax(-1, keepdim=True)
        p = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        c = torch.cumsum(torch.gather(p, -1, order), -1)
        count = torch.minimum((c < tau).sum(-1) + 1, n_el)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return (rank < count[..., None]) & e


def select(route: Route, scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """bool ``[H, groups, blocks]``, as :func:`attnlang.routing.select`."""
    H, G, nb = scores.shape
    eligible = eligible.expand(H, G, nb)
    if route.scope == "head":
        s = scores.transpose(1, 2).reshape(H, 1, nb * G)
        e = eligible.transpose(1, 2).reshape(H, 1, nb * G)
        top = None if route.top is None else route.top * G
        return _select_rows(s, e, top, route.threshold).reshape(H, nb, G).transpose(1, 2)
    return _select_rows(scores, eligible, route.top, route.threshold)


def route_content(route: Route, layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """One Route's content entries for one batch item (``q [Hq, N, D]``, ``k [Hkv, N, D]``)."""
    dev = q.device
    Hq = q.shape[0]
    kv_of = torch.arange(Hq, device=dev) // (Hq // k.shape[0])
    G, nb = route.groups(layout), route.blocks(layout)
    with torch.no_grad():
        qmean = _segment_mean(q, torch.from_numpy(group_ids(route, layout)).to(dev), G)
        out: dict[Any, np.ndarray] = {}
        if route.permute is None:
            kmean = _segment_mean(k, torch.from_numpy(block_ids(route, layout)).to(dev), nb)[kv_of]
            elig = torch.from_numpy(eligibility(route, layout)).to(dev)[None]
        else:
            perm = importance_perm(route, q, k, scale)
            pos = torch.argsort(perm, dim=-1)
            blk = pos // route.block[0]
            kk = k.float()[kv_of]
            kmean = torch.zeros((Hq, nb, k.shape[-1]), dtype=torch.float32, device=dev)
            kmean.scatter_add_(1, blk[..., None].expand_as(kk), kk)
            kmean = kmean / torch.bincount(blk[0], minlength=nb).clamp_min(1).float()[None, :, None]
            perm_np = perm.cpu().numpy()
            elig = torch.from_numpy(eligibility_permuted(route, layout, perm_np)).to(dev)
            out[(route, "perm")], out[(route, "pos")] = perm_np, pos.cpu().numpy()
        if dev.type == "cpu":
            # Scores as the oracle computes them (einsum, not matmul: the last bits decide
            # threshold cuts near 1), and numpy's sort of many short rows is faster here.
            from attnlang.routing import select as np_select

            scores = np.einsum("hgd,hbd->hgb", qmean.numpy(), kmean.numpy()).astype(np.float32) * np.float32(scale)
            out[route] = np_select(route, scores, elig.numpy())
        else:
            scores = torch.matmul(qmean, kmean.transpose(1, 2)) * scale
            out[route] = select(route, scores, elig).cpu().numpy()
    return out


def pattern_content(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """Every Route's content for one batch item; ``{}`` for patterns without ``route``."""
    out: dict[Any, np.ndarray] = {}
    for r in routes(pattern):
        out.update(route_content(r, pattern.layout, q, k, scale))
    return out


__all__ = ["pattern_content", "route_content", "select", "importance_perm"]
