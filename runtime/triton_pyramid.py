"""Triton kernels for ``pyramid(...)`` (PSA, docs/language.md §13.2): pooling, attention, backward.

The semantics and the selection are :mod:`attnlang.runtime.pyramid`'s; this module only runs
them as kernels. Per call:

1. **levels** (no gradient): :func:`attnlang.runtime.pyramid.levels` per batch item, and its
   gather index of the *virtual keys* each (query head, query group) attends to;
2. **pooling** (``_pool``): K and V in block order, averaged in runs of ``l`` for every level
   ``l`` into fp32 virtual keys, laid out level after level as the torch path's;
3. **attention** (``_fwd``): one program per (query head, query group, tile of the group's
   tokens), online softmax over the group's virtual keys with logit
   ``scale * <q, mean K> + ln(l)``; a run is visible when ``among`` allows ``q`` every key of
   it, evaluated as ``KEYPOS[run] <= QPOS[q]`` (``full``: both 0; ``causal``: the run's last
   flat index against ``q``'s; ``causal(a)``: the same on axis ``a``);
4. **backward**: ``_bwd_dq`` recomputes each group's tiles for dQ; ``_bwd_dkv`` runs per
   (KV head, tile of virtual keys) over the query groups that selected any of them (an inverse
   table built per call), so d(virtual K/V) is summed without atomics; the pooling's gradient
   (each run's gradient divided by ``l`` back onto its keys) is O(N*D) torch ops.

Other ``among`` expressions are refused (:func:`refusal`): their visibility is not a position
comparison, and the torch backend evaluates them.

>>> import attnlang, torch                                                  # doctest: +SKIP
>>> p = attnlang.Pattern.create(attnlang.pattern.pyramid(64, 64, [1, 2, 4], [0.2, 0.2, 0.2],
...                             attnlang.causal), 4096)                     # doctest: +SKIP
>>> attnlang.compile(p, backend="triton")(q.cuda(), k.cuda(), v.cuda())     # doctest: +SKIP
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from attnlang.pattern import Causal, Full, Pattern
from attnlang.runtime import pyramid as torch_pyramid
from attnlang.runtime.call import Call

_LOG2E = 1.4426950408889634
BLOCK_R = 32  # virtual keys per pooling program


def refusal(call: Call) -> str | None:
    """Why the Triton pyramid kernels cannot run ``call`` (None when they can): visibility is
    evaluated as a position comparison, which covers ``among = full``, ``causal`` and
    ``causal(axis)`` only.

    >>> p = Pattern.create(pyramid(8, 8, [1, 2], [0.5, 0.5], causal & sliding(9)), 32)  # doctest: +SKIP
    >>> refusal(check_call(p, q, q, q, None, {}, None))                               # doctest: +SKIP
    "pyramid among = causal & sliding(9): the Triton pyramid kernels evaluate ..."
    """
    among = call.pattern.attend.among
    if isinstance(among, (Full, Causal)):
        return None
    return (f"pyramid among = {among.to_attn()}: the Triton pyramid kernels evaluate run visibility "
            "only for among = full, causal or causal(axis); use backend='torch' (it evaluates any "
            "among)")


@dataclass(frozen=True)
class KernelStatic:
    """What the kernels read that depends on the pattern only (int32/fp32 on the device)."""

    korder: torch.Tensor  # [N]: tokens in block order
    qpad: torch.Tensor  # [nq * gm]: group slot -> token, -1 = padding
    vk_log2l: torch.Tensor  # fp32 [M]: log2 of each virtual key's level (its logit bonus)
    vk_level: torch.Tensor  # [M]
    vk_block: torch.Tensor  # [M]: key block of each virtual key
    keypos: torch.Tensor  # [M]: visible to q iff keypos <= qpos[q]
    qpos: torch.Tensor  # [N]
    m: int  # virtual keys (all levels)


def _gather_index(st: torch_pyramid.Static, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
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


@functools.lru_cache(maxsize=16)
def _static(pattern: Pattern, device: str) -> tuple[torch_pyramid.Static, KernelStatic]:
    st = torch_pyramid.static_of(pattern, device)
    layout, among = pattern.layout, pattern.attend.among
    n = layout.n
    kids = st.kids.cpu().numpy()
    qpad = np.where(st.qpad_np < n, st.qpad_np, -1)
    if isinstance(among, Causal):
        # A run is visible when its largest coordinate (flat, or on the axis) is at most q's.
        pos = np.arange(n) if among.axis is None else layout.coords(np.arange(n))[layout.index(among.axis)]
        keypos = np.concatenate([pos[st.korder_np].reshape(-1, lv).max(axis=1) for lv in st.levels])
        qpos = pos
    else:  # full: every run is visible
        keypos, qpos = np.zeros(len(st.vk_level)), np.zeros(n)
    dev = torch.device(device)
    i32 = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int32, device=dev)  # noqa: E731
    return st, KernelStatic(
        i32(st.korder_np), i32(qpad),
        torch.as_tensor(np.log2(st.vk_level).astype(np.float32), device=dev),
        i32(st.vk_level), i32(kids[st.korder_np[st.vk_first]]), i32(keypos), i32(qpos), len(st.vk_level))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _pool(K, V, PK, PV, KORDER, N_TOKENS, M, RUNS, LEVEL, OFFSET,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # Virtual keys OFFSET + r for runs r of LEVEL keys in block order: fp32 means of K and V.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (r < RUNS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc_k = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i in range(0, LEVEL):
        tok = tl.load(KORDER + r * LEVEL + i, mask=r < RUNS, other=0)
        src = bh * N_TOKENS * HEAD_DIM + tok[:, None] * HEAD_DIM + offs_d[None, :]
        acc_k += tl.load(K + src, mask=ok, other=0.0).to(tl.float32)
        acc_v += tl.load(V + src, mask=ok, other=0.0).to(tl.float32)
    dst = bh * M * HEAD_DIM + (OFFSET + r)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(PK + dst, acc_k / LEVEL, mask=ok)
    tl.store(PV + dst, acc_v / LEVEL, mask=ok)


@triton.jit
def _group_rows(QPAD, QPOS, g, s0, GM, BLOCK_M: tl.constexpr):
    # Tokens of slots s0.. of query group g (-1 = padding) and their visibility positions.
    slot = s0 + tl.arange(0, BLOCK_M)
    tok = tl.load(QPAD + g * GM + slot, mask=slot < GM, other=-1)
    qpos = tl.load(QPOS + tok, mask=tok >= 0, other=-1)
    return tok, qpos


@triton.jit
def _query_rows(QPAD, QPOS, H, GQA, N_TOKENS, M, NQ, GM, M_TILES,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # This program's query rows: slots s0.. of query group g of (batch, head) bh; tokens
    # (-1 = padding), visibility positions, offsets into Q-shaped tensors and the K/V base.
    g = tl.program_id(0) // M_TILES
    s0 = (tl.program_id(0) % M_TILES) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_base = (b.to(tl.int64) * (H // GQA) + h // GQA) * M * HEAD_DIM
    row = bh.to(tl.int64) * NQ + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok, qpos = _group_rows(QPAD, QPOS, g, s0, GM, BLOCK_M)
    q_ok = tok >= 0
    q_rows = bh.to(tl.int64) * N_TOKENS * HEAD_DIM + tok[:, None] * HEAD_DIM + offs_d[None, :]
    return bh, kv_base, row, tok, qpos, q_ok, q_rows, offs_d, d_ok


@triton.jit
def _fwd(Q, PK, PV, O, LSE, VIDX, COUNT, QPAD, QPOS, KEYPOS, LOG2L, qk_scale,
         H, GQA, N_TOKENS, M, NQ, GM, W, M_TILES,
         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    bh, kv_base, row, tok, qpos, q_ok, q_rows, offs_d, d_ok = _query_rows(
        QPAD, QPOS, H, GQA, N_TOKENS, M, NQ, GM, M_TILES, HEAD_DIM, BLOCK_D, BLOCK_M)
    q = tl.load(Q + q_rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for w in range(0, tl.load(COUNT + row), BLOCK_N):
        vk = tl.load(VIDX + row * W + w + tl.arange(0, BLOCK_N), mask=w + tl.arange(0, BLOCK_N) < W, other=-1)
        vk_ok = vk >= 0
        kv_rows = kv_base + vk[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = vk_ok[:, None] & d_ok[None, :]
        kT = tl.trans(tl.load(PK + kv_rows, mask=kv_mask, other=0.0).to(q.dtype))
        v = tl.load(PV + kv_rows, mask=kv_mask, other=0.0).to(q.dtype)
        keypos = tl.load(KEYPOS + vk, mask=vk_ok, other=0)
        log2l = tl.load(LOG2L + vk, mask=vk_ok, other=0.0)
        # base 2: scale * log2(e) is folded into qk_scale and ln(l) becomes log2(l)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale + log2l[None, :]
        vis = q_ok[:, None] & vk_ok[None, :] & (keypos[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        # A row with nothing visible so far keeps m = -inf; shift it by 0 (no (-inf) - (-inf)).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # a row that sees nothing: zero output and lse = -inf (as the reference)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + q_rows, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * N_TOKENS + tok, lse, mask=q_ok)


@triton.jit
def _bwd_dq(Q, PK, PV, DO, DQ, LSE, DELTA, VIDX, COUNT, QPAD, QPOS, KEYPOS, LOG2L, qk_scale, sm_scale,
            H, GQA, N_TOKENS, M, NQ, GM, W, M_TILES,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    bh, kv_base, row, tok, qpos, q_ok, q_rows, offs_d, d_ok = _query_rows(
        QPAD, QPOS, H, GQA, N_TOKENS, M, NQ, GM, M_TILES, HEAD_DIM, BLOCK_D, BLOCK_M)
    q = tl.load(Q + q_rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N_TOKENS + tok, mask=q_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # empty rows: p masked to 0
    delta = tl.load(DELTA + bh.to(tl.int64) * N_TOKENS + tok, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for w in range(0, tl.load(COUNT + row), BLOCK_N):
        vk = tl.load(VIDX + row * W + w + tl.arange(0, BLOCK_N), mask=w + tl.arange(0, BLOCK_N) < W, other=-1)
        vk_ok = vk >= 0
        kv_rows = kv_base + vk[None, :] * HEAD_DIM + offs_d[:, None]
        kv_mask = vk_ok[None, :] & d_ok[:, None]
        kT = tl.load(PK + kv_rows, mask=kv_mask, other=0.0).to(q.dtype)
        vT = tl.load(PV + kv_rows, mask=kv_mask, other=0.0).to(q.dtype)
        keypos = tl.load(KEYPOS + vk, mask=vk_ok, other=0)
        log2l = tl.load(LOG2L + vk, mask=vk_ok, other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale + log2l[None, :]
        vis = q_ok[:, None] & vk_ok[None, :] & (keypos[None, :] <= qpos[:, None])
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    tl.store(DQ + q_rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dkv(Q, PK, PV, DO, DPK, DPV, LSE, DELTA, TPTR, TGROUP, SEL, QPAD, QPOS, KEYPOS, LOG2L,
             VK_BLOCK, VK_LEVEL, qk_scale, sm_scale, H, GQA, N_TOKENS, M, NQ, NK, GM, T,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    bhk = tl.program_id(1)
    HKV = H // GQA
    b = bhk // HKV
    hk = bhk % HKV
    kv_base = bhk.to(tl.int64) * M * HEAD_DIM
    vk = t * BLOCK_N + tl.arange(0, BLOCK_N)
    vk_ok = vk < M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_rows = kv_base + vk[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = vk_ok[:, None] & d_ok[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the virtual keys' dtype for the products is q's (fp32 storage keeps the means exact)
    k = tl.load(PK + kv_rows, mask=kv_mask, other=0.0).to(Q.dtype.element_ty)
    v = tl.load(PV + kv_rows, mask=kv_mask, other=0.0).to(Q.dtype.element_ty)
    keypos = tl.load(KEYPOS + vk, mask=vk_ok, other=0)
    log2l = tl.load(LOG2L + vk, mask=vk_ok, other=0.0)
    blk = tl.load(VK_BLOCK + vk, mask=vk_ok, other=0)
    lvl = tl.load(VK_LEVEL + vk, mask=vk_ok, other=-1)
    # every query head of this KV head's GQA group in order: deterministic, no atomics
    for h in range(hk * GQA, hk * GQA + GQA):
        bh = b.to(tl.int64) * H + h
        q_base = bh * N_TOKENS * HEAD_DIM
        entry = bh * T + t
        # only the query groups that selected a virtual key of this tile (the inverse table)
        for e in range(tl.load(TPTR + entry), tl.load(TPTR + entry + 1)):
            g = tl.load(TGROUP + e)
            # a virtual key belongs to this group's selection iff its block got its level
            chosen = tl.load(SEL + (bh * NQ + g) * NK + blk, mask=vk_ok, other=0) == lvl
            for s0 in range(0, GM, BLOCK_M):
                tok, qpos = _group_rows(QPAD, QPOS, g, s0, GM, BLOCK_M)
                q_ok = tok >= 0
                q_rows = q_base + tok[:, None] * HEAD_DIM + offs_d[None, :]
                q = tl.load(Q + q_rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(DO + q_rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(LSE + bh * N_TOKENS + tok, mask=q_ok, other=0.0)
                lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
                delta = tl.load(DELTA + bh * N_TOKENS + tok, mask=q_ok, other=0.0)
                # transposed scores [BLOCK_N, BLOCK_M]: dK and dV need P^T and dS^T
                sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + log2l[:, None]
                vis = (chosen & vk_ok)[:, None] & q_ok[None, :] & (keypos[:, None] <= qpos[None, :])
                pT = tl.where(vis, tl.exp2(sT - lse2[None, :]), 0.0)
                dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
                dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dsT = pT * (dpT - delta[None, :])
                dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    tl.store(DPK + kv_rows, dk * sm_scale, mask=kv_mask)
    tl.store(DPV + kv_rows, dv, mask=kv_mask)


# --------------------------------------------------------------------------------------------
# per-call tables, launches, autograd
# --------------------------------------------------------------------------------------------

@dataclass
class Tables:
    """One call's selection as kernel arguments (int32 on the device)."""

    vidx: torch.Tensor  # [B, Hq, nq, W]: virtual keys of each head's group, -1 = padding
    count: torch.Tensor  # [B, Hq, nq]: how many of them are real (they come first)
    sel: torch.Tensor  # [B, Hq, nq, nk]: level of each block (0 = skipped)
    tptr: torch.Tensor  # [B * Hq * T + 1]: per (head, virtual-key tile), a range of tgroup
    tgroup: torch.Tensor  # query groups that selected a virtual key of that tile
    width: int


def _tables(call: Call, st: torch_pyramid.Static, m: int) -> Tables:
    B, H = call.batch, call.heads
    block_n = _block_n(call.q.shape[-1])
    tiles = -(-m // block_n)
    sels, vidxs, counts, marks = [], [], [], []
    for b in range(B):
        table = torch_pyramid.levels(call, b).cpu().numpy()
        vidx, valid, _ = _gather_index(st, table)
        hh, gg, ww = np.nonzero(valid)
        mark = np.zeros((H, tiles, st.nq), dtype=bool)  # (head, tile, group): any key selected
        mark[hh, vidx[hh, gg, ww] // block_n, gg] = True
        sels.append(table)
        vidxs.append(np.where(valid, vidx, -1))
        counts.append(valid.sum(axis=-1))
        marks.append(mark)
    width = max(v.shape[-1] for v in vidxs)
    vidx = np.stack([np.pad(v, ((0, 0), (0, 0), (0, width - v.shape[-1])), constant_values=-1)
                     for v in vidxs])
    mark = np.stack(marks)  # [B, H, T, nq]
    tptr = np.zeros(mark.shape[0] * H * tiles + 1, dtype=np.int64)
    tptr[1:] = np.cumsum(mark.sum(axis=-1).reshape(-1))
    dev = call.q.device
    i32 = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int32, device=dev)  # noqa: E731
    return Tables(i32(vidx), i32(np.stack(counts)), i32(np.stack(sels)), i32(tptr),
                  i32(np.nonzero(mark)[3]), width)


def _block_n(d: int) -> int:
    """Virtual keys per tile: 64, or 32 for head dims over 128 (registers and shared memory)."""
    return 64 if d <= 128 else 32


def _meta(q: torch.Tensor, gm: int) -> dict:
    d = q.shape[-1]
    block_n = _block_n(d)
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_M=min(block_n, max(16, triton.next_power_of_2(gm))), BLOCK_N=block_n,
                num_warps=4 if d <= 64 else 8,
                # fp32 inputs get exact fp32 products, not TF32
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _virtual_kv(x_k: torch.Tensor, x_v: torch.Tensor, st: torch_pyramid.Static,
                ks: KernelStatic) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual keys ``(pk, pv)`` fp32 ``[B, Hkv, M, D]`` of ``k, v [B, Hkv, N, D]``: for each
    level ``l`` (ascending) the means of runs of ``l`` keys in block order, as
    ``attnlang.runtime.pyramid._pooled`` lays them out."""
    B, Hkv, N, D = x_k.shape
    pk = torch.empty(B, Hkv, ks.m, D, device=x_k.device, dtype=torch.float32)
    pv = torch.empty_like(pk)
    for lv in st.levels:
        runs = N // lv
        _pool[(triton.cdiv(runs, BLOCK_R), B * Hkv)](
            x_k, x_v, pk, pv, ks.korder, N, ks.m, runs, lv, st.offset[lv],
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_R=BLOCK_R)
    return pk, pv


def _unpool(d: torch.Tensor, st: torch_pyramid.Static, korder: torch.Tensor) -> torch.Tensor:
    """The pooling's gradient: ``d [B, Hkv, M, D]`` (per virtual key) -> ``[B, Hkv, N, D]`` in
    token order; every key of a run of ``l`` gets the run's gradient divided by ``l``."""
    n = korder.shape[0]
    blocked = sum(d[:, :, st.offset[lv]:st.offset[lv] + n // lv].repeat_interleave(lv, dim=2) / lv
                  for lv in st.levels)
    return torch.empty_like(blocked).index_copy_(2, korder.long(), blocked)


class _Pyramid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, st, ks, tb):
        B, H, N, _ = q.shape
        gqa = H // k.shape[1]
        pk, pv = _virtual_kv(k, v, st, ks)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        meta = _meta(q, st.gm)
        m_tiles = triton.cdiv(st.gm, meta["BLOCK_M"])
        _fwd[(st.nq * m_tiles, B * H)](q, pk, pv, o, lse, tb.vidx, tb.count, ks.qpad, ks.qpos, ks.keypos,
                                       ks.vk_log2l, scale * _LOG2E, H, gqa, N, ks.m, st.nq, st.gm,
                                       tb.width, m_tiles, **meta)
        ctx.save_for_backward(q, pk, pv, o, lse)
        ctx.scale, ctx.st, ctx.ks, ctx.tb, ctx.kv_dtype = scale, st, ks, tb, k.dtype
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, pk, pv, o, lse = ctx.saved_tensors
        st, ks, tb, scale = ctx.st, ctx.ks, ctx.tb, ctx.scale
        B, H, N, _ = q.shape
        hkv = pk.shape[1]
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = (o.float() * do.float()).sum(-1)
        if dlse is not None:
            # d lse / d s = P: a loss reading lse adds P * dlse to dS = P * (dP - delta).
            delta = delta - torch.where(torch.isinf(lse), 0.0, dlse.float())
        meta = _meta(q, st.gm)
        m_tiles = triton.cdiv(st.gm, meta["BLOCK_M"])
        dq = torch.empty_like(q)
        _bwd_dq[(st.nq * m_tiles, B * H)](q, pk, pv, do, dq, lse, delta, tb.vidx, tb.count, ks.qpad, ks.qpos,
                                          ks.keypos, ks.vk_log2l, scale * _LOG2E, scale, H, H // hkv, N,
                                          ks.m, st.nq, st.gm, tb.width, m_tiles, **meta)
        dpk, dpv = torch.empty_like(pk), torch.empty_like(pv)
        tiles = triton.cdiv(ks.m, meta["BLOCK_N"])
        _bwd_dkv[(tiles, B * hkv)](q, pk, pv, do, dpk, dpv, lse, delta, tb.tptr, tb.tgroup, tb.sel, ks.qpad,
                                   ks.qpos, ks.keypos, ks.vk_log2l, ks.vk_block, ks.vk_level, scale * _LOG2E,
                                   scale, H, H // hkv, N, ks.m, st.nq, st.nk, st.gm, tiles, **meta)
        dk = _unpool(dpk, st, ks.korder).to(ctx.kv_dtype)
        dv = _unpool(dpv, st, ks.korder).to(ctx.kv_dtype)
        return dq, dk, dv, None, None, None, None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)``, differentiable in q, k,
    v (and through lse); the selection is not differentiated. The triton backend's ``run``
    dispatches pyramid patterns here.

    >>> out, lse = run(check_call(p, q.cuda(), k.cuda(), v.cuda(), None, {}, None))  # doctest: +SKIP
    """
    st, ks = _static(call.pattern, str(call.q.device))
    tb = _tables(call, st, ks.m)
    q, k, v = call.q.contiguous(), call.k.contiguous(), call.v.contiguous()
    return _Pyramid.apply(q, k, v, call.scale, st, ks, tb)
