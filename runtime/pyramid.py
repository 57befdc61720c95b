"""The torch path for ``pyramid(...)`` (PSA, docs/language.md §13.2): selection, pooling, attention.

Per batch item:

1. **levels** (no gradient): query-group and key-block means by ``index_add_`` (fp32), scores
   ``scale * mean(Q) . mean(K)``, a stable descending sort over the eligible blocks (ties go to
   the lower block), rank slices -> levels. O(N*D + groups*blocks*D); equal to the numpy
   oracle :func:`attnlang.pyramid.level_table` (tested);
2. **pooled keys**: keys in block order (row-major inside each block) are cut into runs of ``l``
   for every level ``l`` and averaged, once, giving *virtual keys* (K and V means);
3. **attention** by the routed executor (:mod:`attnlang.runtime.routed`), one tile set per
   level: a tile is one (head, query group) against the concatenated virtual keys of the
   blocks it sees at that level, so a block at level ``l`` costs ``1/l`` of its dense tiles,
   and tiles are sorted by width so the fused CPU attention op runs long chunks that pad
   little. The logit ``+ ln(l)`` of a pooled key is the same for a whole level, so it is added
   to that set's ``lse`` before the exact log-sum-exp merge instead of being a bias. Masks only
   where ``among`` cuts a (group, block) pair (the planner's classes, static) or a block is
   ragged: a run is visible to ``q`` when ``among`` allows ``q`` every key of it.

Gradients flow to Q, K and V through the attention (the executor's fused backward, per chunk)
and the pooling (autograd); the selection itself is not differentiated, as in the paper.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from attnlang.pattern import Env, Pattern, Pyramid, Route
from attnlang.plan import PARTIAL
from attnlang.boxes import box_order, token_boxes
from attnlang.pyramid import eligible, level_bounds
from attnlang.routing import group_block_classes
from attnlang.runtime.call import Call
from attnlang.runtime.tilesets import GroupTiles, TileSetAttention

MASK_PAIRS = 1 << 24  # (query, key) pairs of `among` evaluated at once for visibility


@dataclass(frozen=True)
class Static:
    """What depends on the pattern only: groups, blocks, orders, eligibility, virtual keys."""

    nq: int
    nk: int
    qids: torch.Tensor  # int64 [N]: query group of each token
    kids: torch.Tensor  # int64 [N]: key block of each token
    qsize: torch.Tensor  # fp32 [nq]
    ksize_t: torch.Tensor  # fp32 [nk]
    korder: torch.Tensor  # int64 [N]: tokens in block order
    gm: int  # largest group
    elig: torch.Tensor  # bool [nq, nk]
    bounds: torch.Tensor  # int64 [nk + 1, len(levels) + 1]
    level_values: torch.Tensor  # int32 [len(levels) + 1]: levels then 0 (skipped)
    levels: tuple[int, ...]  # distinct levels, ascending
    offset: dict[int, int]  # first virtual key of each level
    # numpy, for building tiles and gather indices
    kstart: np.ndarray  # [nk + 1] in block order
    vk_level: np.ndarray  # [M]: level of each virtual key
    vk_first: np.ndarray  # [M]: first position of the run in block order
    korder_np: np.ndarray
    qpad_np: np.ndarray  # [nq * Gm]: group slot -> token (N = padding)


@functools.lru_cache(maxsize=16)
def static_of(pattern: Pattern, device: str) -> Static:
    """What a pyramid pattern fixes for every call on ``device`` (cached): groups, blocks, orders,
    eligibility, virtual keys. Shared with the Triton pyramid path."""
    p: Pyramid = pattern.attend
    layout = pattern.layout
    n = layout.n
    qids, nq = token_boxes(layout, p.query_block)
    kids, nk = token_boxes(layout, p.block)
    korder, kstart = box_order(kids, nk)
    qorder, qstart = box_order(qids, nq)
    qsize = np.diff(qstart)
    gm = int(qsize.max())
    qpad = np.full((nq, gm), n, dtype=np.int64)
    slot = np.arange(n) - np.repeat(qstart[:-1], qsize)
    qpad[qids[qorder], slot] = qorder
    levels = tuple(sorted(set(p.levels)))
    offset, lv, first = {}, [], []
    m = 0
    for lvl in levels:
        offset[lvl] = m
        runs = n // lvl
        lv.append(np.full(runs, lvl))
        first.append(np.arange(runs) * lvl)
        m += runs
    dev = torch.device(device)
    t = lambda x, dt=torch.int64: torch.as_tensor(np.ascontiguousarray(x), dtype=dt, device=dev)  # noqa: E731
    return Static(
        nq, nk, t(qids), t(kids), t(qsize, torch.float32), t(np.diff(kstart), torch.float32), t(korder),
        gm, t(eligible(p, layout), torch.bool), t(level_bounds(p, nk)),
        t(np.asarray(p.levels + (0,)), torch.int32), levels, offset, kstart,
        np.concatenate(lv), np.concatenate(first), korder, qpad.reshape(-1))


# --------------------------------------------------------------------------------------------
# 1. levels
# --------------------------------------------------------------------------------------------

def levels(call: Call, b: int) -> torch.Tensor:
    """int32 ``[Hq, query groups, key blocks]``: the level each head's group sees each block at
    (0 = skipped) for batch item ``b``; the torch twin of :func:`attnlang.pyramid.level_table`."""
    p: Pyramid = call.pattern.attend
    st = static_of(call.pattern, str(call.q.device))
    with torch.no_grad():
        q, k = call.q[b].float(), call.k[b].float()
        mq = q.new_zeros(q.shape[0], st.nq, q.shape[2]).index_add_(1, st.qids, q) / st.qsize[:, None]
        mk = k.new_zeros(k.shape[0], st.nk, k.shape[2]).index_add_(1, st.kids, k) / st.ksize_t[:, None]
        mk = mk.repeat_interleave(call.heads // call.kv_heads, dim=0)
        s = torch.matmul(mq, mk.transpose(1, 2)) * torch.tensor(call.scale, dtype=torch.float32)
        s = s.masked_fill(~st.elig, float("-inf"))
        # Stable descending sort: equal scores keep block order, so ties go to the lower block;
        # ineligible blocks (-inf) sort last and are zeroed below.
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(st.nk, device=s.device).expand_as(order))
        bounds = st.bounds[st.elig.sum(-1)]  # [nq, len(levels) + 1]
        which = (rank.unsqueeze(-1) >= bounds[None, :, None, 1:]).sum(-1)
        return torch.where(st.elig, st.level_values[which], 0).to(torch.int32)


# --------------------------------------------------------------------------------------------
# 2.-3. virtual keys and attention
# --------------------------------------------------------------------------------------------

def _pooled(x: torch.Tensor, st: Static) -> torch.Tensor:
    """``x [H, N, D]`` -> virtual keys ``[H, M, D]``: means of runs of ``l`` keys in block order."""
    xs = x.index_select(1, st.korder)
    H, N, D = xs.shape
    return torch.cat([xs.view(H, N // lv, lv, D).mean(dim=2) for lv in st.levels], dim=1)


@dataclass(frozen=True)
class Level:
    """One level's virtual keys as block slots, and the masks of the (group, block) pairs that
    need one (static: per pattern)."""

    level: int
    bk: int  # slots per block: the largest block's token count / level
    vkey: np.ndarray  # int64 [nk, bk]: head-relative virtual key of each slot, -1 padding
    mask_id: np.ndarray  # int64 [nq, nk]: row of ``allow`` for masked pairs, -1 for the others
    allow: np.ndarray  # bool [P, Gm, bk]: query slot x virtual key of each masked pair


@functools.lru_cache(maxsize=16)
def _levels_static(pattern: Pattern, device: str) -> dict[int, Level]:
    """Every level's slots and masks. A pair needs a mask where ``among`` is PARTIAL on it (the
    planner's exact class; every eligible pair when the boxes are not tiles) or its block is
    ragged (padding slots)."""
    p: Pyramid = pattern.attend
    st = static_of(pattern, device)
    layout, n = pattern.layout, pattern.n
    elig = st.elig.cpu().numpy()
    cls = group_block_classes(p.among, Route(p.block, top=1, among=p.among, query_block=p.query_block), layout)
    partial = elig if cls is None else cls == PARTIAL
    sizes = np.diff(st.kstart)
    qtok = np.minimum(st.qpad_np.reshape(st.nq, st.gm), n - 1)  # padding slots go to the sink
    env = Env(layout)
    out = {}
    for lv in st.levels:
        bk = int(sizes.max()) // lv
        slot = np.arange(bk)
        runs = sizes // lv
        vkey = np.where(slot[None] < runs[:, None], st.offset[lv] + st.kstart[:-1, None] // lv + slot[None], -1)
        g, j = np.nonzero(elig & (partial | (runs < bk)[None, :]))
        allow = np.zeros((len(g), st.gm, bk), dtype=bool)
        step = max(1, MASK_PAIRS // (st.gm * bk * lv))
        for a in range(0, len(g), step):
            gg, jj = g[a:a + step], j[a:a + step]
            pos = st.kstart[jj][:, None, None] + slot[None, :, None] * lv + np.arange(lv)[None, None, :]
            ktok = st.korder_np[np.minimum(pos, n - 1)]  # [P, bk, lv]: members of each run
            ok = p.among.allowed(layout.points(qtok[gg][:, :, None, None]), layout.points(ktok[:, None]), env)
            allow[a:a + step] = np.broadcast_to(ok, (len(gg), st.gm, bk, lv)).all(-1) & \
                (slot[None, :] < runs[jj][:, None])[:, None, :]
        mask_id = np.full((st.nq, st.nk), -1, dtype=np.int64)
        mask_id[g, j] = np.arange(len(g))
        out[lv] = Level(lv, bk, vkey, mask_id, allow)
    return out


def _tiles(call: Call, st: Static, tables: list[np.ndarray]) -> list[GroupTiles]:
    """One tile set per level: a tile per (batch item, head, group) with blocks at that level,
    its keys the blocks' virtual keys; tiles sorted by block count (chunks pad little)."""
    Hq, Hkv, N, B = call.heads, call.kv_heads, call.pattern.n, call.batch
    M = len(st.vk_level)
    dev = call.q.device
    qtok = st.qpad_np.reshape(st.nq, st.gm)
    sets = []
    for lv, L in _levels_static(call.pattern, str(dev)).items():
        found = [(np.full(len(h), b), h, g, j) for b, t in enumerate(tables) for h, g, j in [np.nonzero(t == lv)]]
        b_, h, g, j = (np.concatenate(x) for x in zip(*found))
        if not len(h):
            continue
        run = (b_ * Hq + h) * st.nq + g  # non-decreasing: nonzero lists (h, g, j) in order
        starts = np.nonzero(np.concatenate([[True], run[1:] != run[:-1]]))[0]
        kc = np.diff(np.concatenate([starts, [len(run)]]))
        rank = np.arange(len(run)) - np.repeat(starts, kc)
        order = np.argsort(kc, kind="stable")
        new_of = np.empty_like(order)
        new_of[order] = np.arange(len(order))
        tile = new_of[np.repeat(np.arange(len(starts)), kc)]
        tb, th, tg, kc = b_[starts][order], h[starts][order], g[starts][order], kc[order]
        kt = np.full((len(kc), int(kc.max()), L.bk), -1, dtype=np.int64)
        kt[tile, rank] = L.vkey[j]
        head = (tb * Hkv + th // (Hq // Hkv)) * M
        k_rows = np.where(kt >= 0, head[:, None, None] + kt, B * Hkv * M).reshape(len(kc), -1)
        qt = qtok[tg]
        q_rows = np.where(qt < N, (tb * Hq + th)[:, None] * N + qt, B * Hq * N).reshape(-1)
        mid = L.mask_id[g, j]
        m = np.nonzero(mid >= 0)[0]
        m = m[np.argsort(tile[m], kind="stable")]  # masked slots by tile (GroupTiles.bias)
        slot_tile, allow = tile[m], L.allow[mid[m]]
        # A row sees nothing only if its tile has no unmasked block and no mask allows it.
        some = np.broadcast_to((kc > np.bincount(slot_tile, minlength=len(kc)))[:, None], qt.shape).copy()
        np.logical_or.at(some, slot_tile, allow.any(-1))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        q = t(q_rows)
        sets.append(GroupTiles(st.gm, L.bk, q, t(k_rows), kc, B * Hkv * M, slot_tile, rank[m], t(allow),
                               t(~some.reshape(-1)), q, shift=math.log(lv)))
    return sets


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)``, differentiable in q, k, v."""
    st = static_of(call.pattern, str(call.q.device))
    B, Hq, N, D = call.q.shape
    tables = [levels(call, b).cpu().numpy() for b in range(B)]
    pk = torch.stack([_pooled(call.k[b].float(), st) for b in range(B)])  # [B, Hkv, M, D]
    pv = torch.stack([_pooled(call.v[b].float(), st) for b in range(B)])
    out, lse = TileSetAttention.apply(call.q, pk, pv, _tiles(call, st, tables), call.scale)
    return out.view(B, Hq, N, call.v_dim).to(call.q.dtype), lse.view(B, Hq, N)
