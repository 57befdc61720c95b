"""The torch path for ``pyramid(...)`` (PSA, LANGUAGE.md §6.2): selection, pooling, attention.

Per batch item:

1. **levels** (no gradient): query-group and key-block means by ``index_add_`` (fp32), scores
   ``scale * mean(Q) . mean(K)``, a stable descending sort over the eligible blocks (ties go to
   the lower block), rank slices -> levels. O(N*D + groups*blocks*D); equal to the numpy
   oracle :func:`attnlang.pyramid.level_table` (tested);
2. **pooled keys**: keys in block order (row-major inside each block) are cut into runs of ``l``
   for every level ``l`` and averaged, once, giving *virtual keys* (K and V means);
3. **attention**: each query group gathers the virtual keys of its selected blocks at their
   levels and attends to them with logit ``scale * <q, mean K> + ln(l)`` (``-inf`` where
   ``among`` does not allow ``q`` every key of the run). Work is ``groups x group size x
   selected virtual keys``: a block at level ``l`` costs ``1/l`` of its dense tiles.

Gradients flow to Q, K and V through the attention and the pooling (autograd, each chunk of
query groups checkpointed so memory stays bounded); the selection itself is not
differentiated, as in the paper.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from attnlang.pattern import Causal, Env, Full, Pattern, Pyramid
from attnlang.pyramid import box_ids, box_order, eligible, level_bounds
from attnlang.runtime.call import Call

CHUNK_BYTES = 32 << 20  # gathered fp32 K+V of one chunk of query groups
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
USE_FUSED = True  # tests switch this off to check the explicit chunk kernel on CPU
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
    qpad: torch.Tensor  # int64 [nq * Gm]: group slot -> token (N = padding)
    qinv: torch.Tensor  # int64 [N]: token -> group slot
    gm: int  # largest group
    elig: torch.Tensor  # bool [nq, nk]
    bounds: torch.Tensor  # int64 [nk + 1, len(levels) + 1]
    level_values: torch.Tensor  # int32 [len(levels) + 1]: levels then 0 (skipped)
    levels: tuple[int, ...]  # distinct levels, ascending
    offset: dict[int, int]  # first virtual key of each level
    # numpy, for building gather indices
    kstart: np.ndarray  # [nk + 1] in block order
    vk_level: np.ndarray  # [M]: level of each virtual key
    vk_last: np.ndarray  # [M]: largest flat key index in the run (causal visibility)
    vk_first: np.ndarray  # [M]: first position of the run in block order
    korder_np: np.ndarray
    qpad_np: np.ndarray


@functools.lru_cache(maxsize=16)
def _static(pattern: Pattern, device: str) -> Static:
    p: Pyramid = pattern.attend
    layout = pattern.layout
    n = layout.n
    qids, nq = box_ids(layout, p.query_block)
    kids, nk = box_ids(layout, p.block)
    korder, kstart = box_order(kids, nk)
    qorder, qstart = box_order(qids, nq)
    qsize = np.diff(qstart)
    gm = int(qsize.max())
    qpad = np.full((nq, gm), n, dtype=np.int64)
    slot = np.arange(n) - np.repeat(qstart[:-1], qsize)
    qpad[qids[qorder], slot] = qorder
    qinv = np.empty(n, dtype=np.int64)
    qinv[qorder] = qids[qorder] * gm + slot
    levels = tuple(sorted(set(p.levels)))
    offset, lv, first, last = {}, [], [], []
    m = 0
    for lvl in levels:
        offset[lvl] = m
        runs = n // lvl
        lv.append(np.full(runs, lvl))
        first.append(np.arange(runs) * lvl)
        last.append(korder.reshape(runs, lvl).max(axis=1))
        m += runs
    dev = torch.device(device)
    t = lambda x, dt=torch.int64: torch.as_tensor(np.ascontiguousarray(x), dtype=dt, device=dev)  # noqa: E731
    return Static(
        nq, nk, t(qids), t(kids), t(qsize, torch.float32), t(np.diff(kstart), torch.float32), t(korder),
        t(qpad.reshape(-1)), t(qinv), gm, t(eligible(p, layout), torch.bool), t(level_bounds(p, nk)),
        t(np.asarray(p.levels + (0,)), torch.int32), levels, offset, kstart,
        np.concatenate(lv), np.concatenate(last), np.concatenate(first), korder, qpad.reshape(-1))


# --------------------------------------------------------------------------------------------
# 1. levels
# --------------------------------------------------------------------------------------------

def levels(call: Call, b: int) -> torch.Tensor:
    """int32 ``[Hq, query groups, key blocks]``: the level each head's group sees each block at
    (0 = skipped) for batch item ``b``; the torch twin of :func:`attnlang.pyramid.level_table`."""
    p: Pyramid = call.pattern.attend
    st = _static(call.pattern, str(call.q.device))
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

def _gather_index(st: Static, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(vidx [Hq, nq, W], valid [Hq, nq, W], W)``: the virtual keys of every head's group."""
    H, nq, _ = table.shape
    h, g, j = np.nonzero(table)  # lexicographic: each (h, g) row's pairs are contiguous
    lv = table[h, g, j].astype(np.int64)
    count = np.diff(st.kstart)[j] // lv
    first = np.array([st.offset[int(x)] for x in st.levels])[np.searchsorted(st.levels, lv)] + st.kstart[j] // lv
    row = h * nq + g
    total = np.bincount(row, weights=count, minlength=H * nq).astype(np.int64)
    width = max(int(total.max(initial=0)), 1)
    before = np.cumsum(count) - count  # virtual keys of earlier pairs, globally
    pos = before - (np.cumsum(total) - total)[row]  # ... within the pair's row
    rep = np.repeat(np.arange(len(count)), count)
    within = np.arange(int(count.sum())) - np.repeat(before, count)
    vidx = np.zeros((H * nq, width), dtype=np.int64)
    valid = np.zeros((H * nq, width), dtype=bool)
    vidx[row[rep], pos[rep] + within] = first[rep] + within
    valid[row[rep], pos[rep] + within] = True
    return vidx.reshape(H, nq, width), valid.reshape(H, nq, width), width


def _visible(pattern: Pattern, st: Static, vidx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """bool ``[Hq, nq, Gm or 1, W]``: ``among`` allows the query every key of the virtual key's run."""
    among, layout = pattern.attend.among, pattern.layout
    H, nq, W = vidx.shape
    qtok = st.qpad_np.reshape(nq, st.gm)
    if isinstance(among, Full):
        return valid[:, :, None, :].copy()  # the same for every query: broadcast over Gm
    if isinstance(among, Causal) and among.axis is None:
        return valid[:, :, None, :] & (st.vk_last[vidx][:, :, None, :] <= qtok[None, :, :, None])
    out = np.zeros((H, nq, st.gm, W), dtype=bool)
    lmax = max(st.levels)
    env = Env(layout)
    # Runs padded to the longest level by repeating their last key (all() is unchanged).
    step = np.minimum(np.arange(lmax)[None, :], st.vk_level[:, None] - 1)
    members = st.korder_np[st.vk_first[:, None] + step]  # [M, lmax]
    rows = max(1, MASK_PAIRS // max(1, st.gm * W * lmax))
    qsafe = np.minimum(qtok, layout.n - 1)  # padding slots are discarded later
    for h in range(H):
        for g0 in range(0, nq, rows):
            g1 = min(nq, g0 + rows)
            qp = layout.points(qsafe[g0:g1, :, None, None])
            kp = layout.points(members[vidx[h, g0:g1]][:, None, :, :])
            a = np.broadcast_to(among.allowed(qp, kp, env), (g1 - g0, st.gm, W, lmax))
            out[h, g0:g1] = a.all(axis=-1) & valid[h, g0:g1, None, :]
    return out


def _attend(qg, kv_k, kv_v, vidx, bias, scale, fused):
    """One chunk: ``qg [H, c, Gm, D]`` against virtual keys ``kv_* [H, M, D]`` picked by
    ``vidx [H, c, W]`` under ``bias [H, c, Gm, W]``; returns ``(out, lse)`` (lse garbage on rows
    that see nothing: the caller fixes those)."""
    H, c, W = vidx.shape
    flat = (vidx + torch.arange(H, device=vidx.device)[:, None, None] * kv_k.shape[1]).reshape(-1)
    kg = kv_k.reshape(-1, kv_k.shape[-1]).index_select(0, flat).view(H, c, W, -1)
    vg = kv_v.reshape(-1, kv_v.shape[-1]).index_select(0, flat).view(H, c, W, -1)
    if fused:  # PyTorch's CPU flash kernel: fused forward and backward (lse not differentiated)
        return _FUSED(qg, kg, vg, attn_mask=bias, scale=scale)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale + bias
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows that see nothing
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    den = torch.where(den > 0, den, torch.ones_like(den))  # finite gradients on empty rows
    return torch.matmul(p, vg) / den, (m + torch.log(den)).squeeze(-1)


def _pooled(x: torch.Tensor, st: Static) -> torch.Tensor:
    """``x [H, N, D]`` -> virtual keys ``[H, M, D]``: means of runs of ``l`` keys in block order."""
    xs = x.index_select(1, st.korder)
    H, N, D = xs.shape
    return torch.cat([xs.view(H, N // lv, lv, D).mean(dim=2) for lv in st.levels], dim=1)


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)``, differentiable in q, k, v."""
    pattern = call.pattern
    st = _static(pattern, str(call.q.device))
    B, Hq, N, D = call.q.shape
    group = Hq // call.kv_heads
    outs, lses = [], []
    for b in range(B):
        table = levels(call, b).cpu().numpy()
        vidx_np, valid, width = _gather_index(st, table)
        vis = torch.from_numpy(_visible(pattern, st, vidx_np, valid)).to(call.q.device)
        log_l = torch.from_numpy(np.log(st.vk_level[vidx_np].astype(np.float32))).to(call.q.device)
        bias = log_l[:, :, None, :].masked_fill(~vis, float("-inf"))
        empty = ~vis.any(dim=-1)  # [Hq, nq, Gm or 1]: zero output, lse = -inf
        vidx = torch.from_numpy(vidx_np).to(call.q.device)
        kv_k = _pooled(call.k[b].float(), st).repeat_interleave(group, dim=0)
        kv_v = _pooled(call.v[b].float(), st).repeat_interleave(group, dim=0)
        q = torch.cat([call.q[b].float(), call.q.new_zeros(Hq, 1, D, dtype=torch.float32)], dim=1)
        qg = q.index_select(1, st.qpad).view(Hq, st.nq, st.gm, D)
        per_group = Hq * width * D * 4 * 2
        step = max(1, min(st.nq, CHUNK_BYTES // max(per_group, 1)))
        chunk_out, chunk_lse = [], []
        fused = USE_FUSED and _FUSED is not None and qg.device.type == "cpu" and not call.want_lse
        for c0 in range(0, st.nq, step):
            c1 = min(st.nq, c0 + step)
            args = (qg[:, c0:c1], kv_k, kv_v, vidx[:, c0:c1], bias[:, c0:c1], call.scale, fused)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
                o, l = checkpoint(_attend, *args, use_reentrant=False)
            else:
                o, l = _attend(*args)
            chunk_out.append(o)
            chunk_lse.append(l)
        o = torch.cat(chunk_out, dim=1).masked_fill(empty[..., None], 0.0).reshape(Hq, st.nq * st.gm, D)
        l = torch.cat(chunk_lse, dim=1).masked_fill(empty, float("-inf")).reshape(Hq, st.nq * st.gm)
        outs.append(o.index_select(1, st.qinv))
        lses.append(l.index_select(1, st.qinv))
    return torch.stack(outs).to(call.q.dtype), torch.stack(lses)
