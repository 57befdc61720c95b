"""The routing stage in torch: ``route(...)`` decisions for one batch item, on Q/K's device.

Same decisions as the numpy oracle :mod:`attnlang.routing` (tested equal), computed in
O(N·D + groups × blocks): pooled means by ``index_add_`` (fp32), scores by one batched matmul,
selection by a stable sort over each group's blocks (or the head's pairs with ``scope = head``;
on CPU a ``threshold`` over the head's pairs sorts only the prefix that reaches it, see
:func:`head_threshold`). Eligibility is static and shared with the oracle (cached per pattern). Results come back as
numpy arrays, which is what the planner and the IR read. Nothing here is differentiated.

    >>> import torch
    >>> from attnlang.pattern import Pattern, route
    >>> p = Pattern.create(route(8, top=1), tokens=32)
    >>> c = pattern_content(p, torch.randn(2, 32, 16), torch.randn(1, 32, 16), 0.25)
    >>> c[p.attend].shape
    (2, 32, 4)
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from attnlang.pattern import Layout, Pattern, Route
from attnlang.boxes import block_ids, group_ids
from attnlang.routing import eligibility, eligibility_permuted, routes, threshold_cut
from attnlang.routing import select as np_select


def segment_mean(x: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of ``x [H, N, D]`` over tokens sharing an id (``ids [N]``): fp32 ``[H, count, D]``.
    Context parallelism pools its own blocks with it too, so a block owner's mean is bit-identical
    to the single-process one."""
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
        count = torch.minimum((c < threshold_cut(tau)).sum(-1) + 1, n_el)
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


LEAF = 1 << 16  # elements per piece of the exact pairwise sum (bounded temporaries; at least 128)


def _pairwise_exp_sum(z: np.ndarray, m: float, lo: int, hi: int) -> float:
    """``np.exp(z[lo:hi].astype(float64) - m).sum()`` bit for bit, with temporaries of at most
    ``LEAF`` elements: numpy sums a contiguous row pairwise (halves cut at a multiple of 8 down
    to blocks of 128), so summing the same halves recursively gives the same rounding."""
    n = hi - lo
    if n <= LEAF:
        return np.exp(z[lo:hi].astype(np.float64) - m).sum()
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_exp_sum(z, m, lo, lo + n2) + _pairwise_exp_sum(z, m, lo + n2, hi)


def _threshold_row(z: np.ndarray, tau: float) -> np.ndarray:
    """:func:`attnlang.routing._select_rows` with ``threshold = tau`` on one fp32 row (``-inf``:
    not eligible), the same decisions bit for bit, without sorting or widening the whole row.

    The oracle's float64 softmax denominator is summed in numpy's pairwise order; its cumulative
    sum runs over the descending values, so only the prefix that reaches ``tau`` is needed: the
    top ``ceil(tau * M)`` entries hold at least ``tau`` of the mass (the top-k of a distribution
    hold at least k / M of it), so a partition to them and a sort of that part suffice (the whole
    row when rounding leaves the prefix short). Ties at the cut go to the lower index.
    """
    M = len(z)
    n_el = int(np.isfinite(z).sum())
    if n_el == 0 or threshold_cut(tau) == math.inf:  # nothing eligible, or all of it
        return np.isfinite(z)
    m = np.float64(z.max())
    den = max(_pairwise_exp_sum(z, m, 0, M), np.finfo(np.float64).tiny)
    k = min(M, math.ceil(tau * M) + 8)
    while True:
        top = -np.sort(-(z if k == M else np.partition(z, M - k)[M - k:]))  # descending
        count, c0 = None, np.float64(0.0)
        for i in range(0, k, LEAF):  # the oracle's sequential cumsum, piece by piece
            w = np.exp(top[i:i + LEAF].astype(np.float64) - m) / den
            w[0] += c0
            c = np.cumsum(w)
            if c[-1] >= tau:
                count = i + int((c < tau).sum()) + 1
                break
            c0 = c[-1]
        if count is not None or k == M:
            count = min(k if count is None else count, n_el)
            break
        k = M
    cut = top[count - 1]
    above = z > cut
    tied = z == cut
    room = count - int(above.sum())
    if int(tied.sum()) > room:
        tied &= np.cumsum(tied) <= room
    return above | tied


def head_threshold(scores: np.ndarray, eligible: np.ndarray, tau: float) -> np.ndarray:
    """``select`` for ``threshold = tau, scope = head`` (bool ``[H, groups, blocks]``) from fp32
    ``scores [H, groups, blocks]``: the same decisions as :func:`attnlang.routing.select`, one
    head at a time in the oracle's flat order (block-major) with :func:`_threshold_row`.

    >>> s = np.array([[[3.0, 1.0], [2.0, 0.0]]], np.float32)
    >>> head_threshold(s, np.ones((1, 2, 2), bool), 0.5).astype(int).tolist()
    [[[1, 0], [0, 0]]]
    """
    H, G, nb = scores.shape
    eligible = np.broadcast_to(eligible, scores.shape)
    out = np.zeros((H, nb, G), dtype=bool)
    for h in range(H):
        z = np.ascontiguousarray(scores[h].T).reshape(-1)
        if not eligible[h].all():
            z[~eligible[h].T.reshape(-1)] = -np.inf
        out[h] = _threshold_row(z, tau).reshape(nb, G)
    return out.transpose(0, 2, 1)


def route_content(route: Route, layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """One Route's content entries for one batch item (``q [Hq, N, D]``, ``k [Hkv, N, D]``).

    ``kernels``: compute them with the Triton routing kernels
    (:mod:`attnlang.runtime.triton_routing`; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``),
    as the triton backend does; else with the torch ops below.
    """
    dev = q.device
    Hq = q.shape[0]
    kv_of = torch.arange(Hq, device=dev) // (Hq // k.shape[0])
    G, nb = route.groups(layout), route.blocks(layout)
    with torch.no_grad():
        qmean = segment_mean(q, torch.from_numpy(group_ids(route, layout)).to(dev), G)
        out: dict[Any, np.ndarray] = {}
        if route.permute is None:
            kmean = segment_mean(k, torch.from_numpy(block_ids(route, layout)).to(dev), nb)[kv_of]
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
            scores = np.einsum("hgd,hbd->hgb", qmean.numpy(), kmean.numpy()).astype(np.float32) * np.float32(scale)
            if route.scope == "head" and route.threshold is not None:  # many pairs: no whole-head sort
                out[route] = head_threshold(scores, elig.numpy(), route.threshold)
            else:
                out[route] = np_select(route, scores, elig.numpy())
        else:
            scores = torch.matmul(qmean, kmean.transpose(1, 2)) * scale
            out[route] = select(route, scores, elig).cpu().numpy()
    return out


def pattern_content(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """Every Route's content for one batch item; ``{}`` for patterns without ``route``
    (:func:`attnlang.runtime.triton_routing.pattern_content` is the same with the Triton kernels)."""
    out: dict[Any, np.ndarray] = {}
    for r in routes(pattern):
        out.update(route_content(r, pattern.layout, q, k, scale))
    return out


__all__ = ["pattern_content", "route_content", "select", "head_threshold", "importance_perm"]
