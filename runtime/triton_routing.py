"""The routing stage as Triton kernels: ``route(...)`` decisions on the tensors' device.

The triton backend computes each call's routing decisions here (the torch backend keeps
:mod:`attnlang.runtime.routing`); the semantics are the numpy oracle's (:mod:`attnlang.routing`,
docs/language.md §13.1), tested equal to it:

1. ``_pool_kernel`` — fp32 means of Q per query group and of K per key block, one program per
   (group, head). Groups and blocks (1-D runs, 2-D/3-D boxes, ragged last ones, or PBS's
   permuted runs) come as a CSR table: tokens sorted by group, ``ptr[g]..ptr[g + 1]``. Groups of
   one token (``query_block = 1``, as in MoBA and VMoBA) skip pooling: the score kernel reads
   Q itself.
2. ``_route_kernel`` — per (tile of query groups, head): ``scale * meanQ . meanK`` over all key
   blocks, masked by the static eligibility table, then the selection row by row: ``top = k``
   or ``threshold = tau`` take the best remaining eligible block (ties: the lower block) until
   ``k`` are taken, or until the float64 softmax mass of the taken ones reaches ``tau``: the
   oracle's cumulative sum in the oracle's order, so the count is the oracle's. It writes the
   int8 selection ``[H, groups, blocks]``.

Decisions equal the oracle's except where two scores (or a cumulative mass and ``tau``) are
within rounding of each other: the pooled sums and dot products are accumulated in another
order than numpy's.

Stays in torch: the PBS importance permutation (``permute_keys``: a softmax over every key for
the last ``B`` queries and a per-segment sort, :func:`attnlang.runtime.routing.importance_perm`),
the eligibility of permuted blocks (host numpy, as the oracle), and the *selection* (not the
scores) when it is joint over a head's (group, block) pairs (``scope = head``: VMoBA selects
among up to ``tokens x blocks`` pairs per head, which the iterative selection cannot hold in one
program) or when a group has more than ``SELECT_BLOCKS`` blocks; the kernel then writes the
scores and :func:`attnlang.runtime.routing.select` sorts them.

    >>> import torch                                                       # doctest: +SKIP
    >>> from attnlang.pattern import Pattern, route                        # doctest: +SKIP
    >>> p = Pattern.create(route(8, top=1), tokens=32)                     # doctest: +SKIP
    >>> q, k = torch.randn(2, 32, 16, device="cuda"), torch.randn(1, 32, 16, device="cuda")  # doctest: +SKIP
    >>> route_content(p.attend, p.layout, q, k, 0.25)[p.attend].shape      # doctest: +SKIP
    (2, 32, 4)
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from attnlang.boxes import token_boxes
from attnlang.pattern import Layout, Pattern, Route
from attnlang.routing import eligibility, eligibility_permuted, routes, threshold_cut
from attnlang.runtime.routing import importance_perm, select

SELECT_BLOCKS = 4096  # widest selection row (blocks per group) one program holds in registers
TILE = 4096  # score-tile elements per program


@triton.jit
def _pool_kernel(X, TOK, PTR, OUT, sxh, sxn, sxd, stok, soh, sog, sod, D, rep,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[h, g, :] = mean of X[h // rep, TOK[h * stok + ptr[g] .. ptr[g + 1]], :] in fp32."""
    g = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    lo = tl.load(PTR + g)
    hi = tl.load(PTR + g + 1)
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    xh = X + (h // rep) * sxh
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < hi
        tok = tl.load(TOK + h * stok + t, mask=tm, other=0).to(tl.int64)
        x = tl.load(xh + tok[:, None] * sxn + dd[None, :] * sxd, mask=tm[:, None] & dm[None, :], other=0.0)
        acc += x.to(tl.float32)
    # div_rn: IEEE division as numpy's (plain `/` is approximate on NVIDIA GPUs)
    mean = tl.math.div_rn(tl.sum(acc, 0), tl.maximum(hi - lo, 1).to(tl.float32))
    tl.store(OUT + h * soh + g.to(tl.int64) * sog + dd * sod, mean, mask=dm)


@triton.jit
def _route_kernel(Q, K, E, TAU, OUT, sqh, sqg, sqd, skh, skd, skb, seh, seg, seb, soh, sog, sob,
                  G, NB, D, rep, scale, top,
                  BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, SELECT: tl.constexpr,
                  THRESHOLD: tl.constexpr):
    """Scores of BLOCK_G query groups against BLOCK_B key blocks; with SELECT (all blocks in
    one tile) the int8 selection of each group, else the fp32 scores."""
    gg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    h = tl.program_id(1).to(tl.int64)
    bb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    gm = gg < G
    bm = bb < NB
    g64 = gg.to(tl.int64)
    b64 = bb.to(tl.int64)
    qp = Q + h * sqh + g64 * sqg
    kp = K + (h // rep) * skh + b64 * skb
    s = tl.zeros([BLOCK_G, BLOCK_B], dtype=tl.float32)
    for d in range(0, D):
        qv = tl.load(qp + d * sqd, mask=gm, other=0.0).to(tl.float32)
        kv = tl.load(kp + d * skd, mask=bm, other=0.0).to(tl.float32)
        s += qv[:, None] * kv[None, :]
    s = s * scale
    inside = gm[:, None] & bm[None, :]
    out = OUT + h * soh + g64[:, None] * sog + b64[None, :] * sob
    if SELECT:
        e = tl.load(E + h * seh + g64[:, None] * seg + b64[None, :] * seb, mask=inside, other=0) != 0
        z = tl.where(e, s, float("-inf"))
        n_el = tl.sum(e.to(tl.int32), 1)
        if THRESHOLD:
            tau = tl.load(TAU)  # float64: a Python float argument would be rounded to fp32
            z64 = z.to(tl.float64)
            mx = tl.max(z64, 1)
            mx = tl.where(mx > float("-inf"), mx, 0.0)
            # >= 1 in rows with an eligible block; the clamp only spares rows without one a 0 / 0
            den = tl.maximum(tl.sum(tl.exp(z64 - mx[:, None]), 1), 1.0)
            acc = tl.zeros([BLOCK_G], dtype=tl.float64)
            limit = n_el
        else:
            limit = tl.minimum(n_el, top)
        taken = tl.zeros([BLOCK_G, BLOCK_B], dtype=tl.int32)
        count = tl.zeros([BLOCK_G], dtype=tl.int32)
        active = (limit > 0).to(tl.int32)
        # Take each active row's best remaining block (the lowest index among equal scores) until
        # the row has `top` blocks, or its softmax mass, summed in this descending order as the
        # oracle's cumsum, reaches tau.
        while tl.max(active, 0) != 0:
            m = tl.max(z, 1)
            idx = tl.min(tl.where(z == m[:, None], bb[None, :], BLOCK_B), 1)
            take = (bb[None, :] == idx[:, None]) & (active[:, None] != 0)
            taken = tl.where(take, 1, taken)
            z = tl.where(take, float("-inf"), z)
            count += active
            more = count < limit
            if THRESHOLD:
                acc += tl.where(active != 0, tl.exp(m.to(tl.float64) - mx) / den, 0.0)
                more = more & (acc < tau)
            active = tl.where(more, active, 0)
        tl.store(out, taken.to(tl.int8), mask=inside)
    else:
        tl.store(out, s, mask=inside)


@functools.lru_cache(maxsize=64)
def _csr(box: tuple, layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by their ``box`` cell (row-major cell numbers, ragged end cells) and the
    cell offsets: int32 ``tok [N]``, ``ptr [cells + 1]`` on ``device``."""
    ids, _ = token_boxes(layout, box)
    tok = np.argsort(ids, kind="stable")
    ptr = np.searchsorted(ids[tok], np.arange(int(ids.max()) + 2))
    return (torch.from_numpy(tok.astype(np.int32)).to(device),
            torch.from_numpy(ptr.astype(np.int32)).to(device))


@functools.lru_cache(maxsize=32)
def _eligible(route: Route, layout: Layout, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(eligibility(route, layout).astype(np.int8)).to(device)


def _pool(x: torch.Tensor, tok: torch.Tensor, ptr: torch.Tensor, heads: int, tok_stride: int,
          transpose: bool = False) -> torch.Tensor:
    """fp32 means of ``x [Hx, N, D]`` over each CSR cell, for ``heads`` output heads (head ``h``
    reads ``x[h // (heads // Hx)]`` and ``tok[h * tok_stride:]``): ``[heads, cells, D]``, or
    ``[heads, D, cells]`` with ``transpose``."""
    cells, D = ptr.numel() - 1, x.shape[-1]
    out = torch.empty((heads, D, cells) if transpose else (heads, cells, D), dtype=torch.float32, device=x.device)
    soh, sog, sod = out.stride(0), out.stride(2 if transpose else 1), out.stride(1 if transpose else 2)
    block_d = triton.next_power_of_2(D)
    _pool_kernel[(cells, heads)](x, tok, ptr, out, x.stride(0), x.stride(1), x.stride(2), tok_stride,
                                 soh, sog, sod, D, heads // x.shape[0],
                                 BLOCK_T=max(1, min(64, 2048 // block_d)), BLOCK_D=block_d)
    return out


def route_content(route: Route, layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """One Route's content entries for one batch item (``q [Hq, N, D]``, ``k [Hkv, N, D]`` on
    CUDA, or on CPU under ``TRITON_INTERPRET=1``), as :func:`attnlang.routing.route_content`:
    ``{route: bool [Hq, groups, blocks]}`` (numpy), plus ``perm``/``pos`` with ``permute_keys``.
    """
    dev = q.device
    Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
    G, nb = route.groups(layout), route.blocks(layout)
    out: dict[Any, np.ndarray] = {}
    with torch.no_grad():
        if math.prod(route.query_block) == 1:  # one token per group: its mean is itself
            qm, sq = q, q.stride()
        else:
            qm = _pool(q, *_csr(route.query_block, layout, dev), Hq, 0)
            sq = qm.stride()
        if route.permute is None:
            km = _pool(k, *_csr(route.block, layout, dev), Hkv, 0, transpose=True)
            elig = _eligible(route, layout, dev)[None]
        else:
            perm = importance_perm(route, q, k, scale)
            ptr = torch.arange(0, nb + 1, device=dev, dtype=torch.int32) * route.block[0]
            km = _pool(k, perm.to(torch.int32).contiguous(), ptr.clamp_max(layout.n), Hq, layout.n, transpose=True)
            perm_np = perm.cpu().numpy()
            elig = torch.from_numpy(eligibility_permuted(route, layout, perm_np).astype(np.int8)).to(dev)
            out[(route, "perm")], out[(route, "pos")] = perm_np, np.argsort(perm_np, axis=-1)
        # Selection in the kernel: a whole row of blocks per program; else scores in tiles.
        in_kernel = route.scope == "query" and nb <= SELECT_BLOCKS
        width = max(16, triton.next_power_of_2(nb))
        block_b = width if in_kernel else min(128, width)
        block_g = max(2, min(triton.next_power_of_2(G), TILE // block_b))
        res = torch.empty((Hq, G, nb), dtype=torch.int8 if in_kernel else torch.float32, device=dev)
        threshold = route.threshold is not None
        tau = torch.tensor([threshold_cut(route.threshold) if threshold else 1.0], dtype=torch.float64, device=dev)
        grid = (triton.cdiv(G, block_g), Hq, triton.cdiv(nb, block_b))
        _route_kernel[grid](qm, km, elig, tau, res, sq[0], sq[1], sq[2],
                            km.stride(0), km.stride(1), km.stride(2),
                            elig.stride(0) if elig.shape[0] > 1 else 0, elig.stride(1), elig.stride(2),
                            res.stride(0), res.stride(1), res.stride(2),
                            G, nb, D, Hq // km.shape[0], scale, route.top or 0,
                            BLOCK_G=block_g, BLOCK_B=block_b, SELECT=in_kernel, THRESHOLD=threshold)
        if in_kernel:
            out[route] = res.cpu().numpy().astype(bool)
        else:
            out[route] = select(route, res, elig.bool()).cpu().numpy()
    return out


def pattern_content(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict:
    """Every Route's content for one batch item, from the kernels above; ``{}`` for patterns
    without ``route`` (as :func:`attnlang.runtime.routing.pattern_content`)."""
    out: dict[Any, np.ndarray] = {}
    for r in routes(pattern):
        out.update(route_content(r, pattern.layout, q, k, scale))
    return out


__all__ = ["route_content", "pattern_content", "SELECT_BLOCKS"]
