"""The `torch` backend: a tile executor in plain PyTorch that follows the Plan.

Per batch item and head group, Q/K/V are put in the plan's kernel order (padding rows read
zeros), then query tiles are processed in chunks: each chunk gathers the key/value tiles its
query tiles visit (:class:`~attnlang.runtime.tiles.TileSchedule` — full tiles, partial tiles, and
fully masked dummy slots that even out ragged rows) into one contiguous block per query tile,
and runs attention on it with an additive ``0 / -inf`` bias that is nonzero only on partial tiles
and dummies. Softmax is in fp32 whatever the input dtype. Results are scattered back to the
user's token order.

The chunk kernel (:mod:`attnlang.runtime.chunks`) is PyTorch's fused CPU flash-attention op where it exists (CPU tensors), which
also gives the log-sum-exp; elsewhere, or when a gradient flows into ``lse``, an explicit
matmul / softmax version of the same computation. Either way memory is bounded by the chunk
(about ``CHUNK_BYTES`` of scores), never by ``N²``.

Autograd is a custom :class:`torch.autograd.Function` whose backward walks the same schedule:
it recomputes each chunk's probabilities from the saved ``lse``, gets dQ per query tile and
the gathered dK/dV, and accumulates those per key tile with ``index_add_`` (deterministic).

GQA: when a head group holds whole GQA groups, the ``G`` query heads sharing a KV head are
stacked as extra query rows against one gathered copy of their K/V tiles (no repeated K/V).
V may have its own head dim ``Dv`` (MLA); the fused op needs ``Dv == D``, else the explicit
kernel runs.

NaN/Inf: a call whose Q/K/V (or, in backward, dO) hold a non-finite value runs every masked
chunk through exact kernels (``where`` masks, :func:`~attnlang.runtime.nonfinite.masked_mm`
products), so no row sees a key or value its pattern hides; all-finite calls pay one
``aminmax`` per tensor for the check.

>>> import torch, attnlang
>>> fn = attnlang.compile(attnlang.causal & attnlang.sliding(8), tokens=64, backend="torch")
>>> q = k = v = torch.randn(1, 2, 64, 16)
>>> fn(q, k, v).shape
torch.Size([1, 2, 64, 16])
"""
from __future__ import annotations

import numpy as np
import torch

from attnlang.pattern import Pyramid
from attnlang.rows import CHUNK_BYTES, chunks
from attnlang.runtime import pyramid, routed
from attnlang.runtime.call import Call
from attnlang.runtime.chunks import chunk_backward, chunk_forward
from attnlang.runtime.nonfinite import all_finite
from attnlang.runtime.tiles import TileSchedule, schedule_for

BIAS_CACHE_BYTES = 64 << 20  # per-chunk masks are kept with the plan when they take at most this


def supports(call: Call) -> str | None:
    """The torch executor runs every static and runtime-input pattern on any device."""
    return None  # pyramid(...) patterns go to attnlang.runtime.pyramid (see run)


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, Dv] in q's dtype, lse [B, Hq, N] fp32)``, differentiable."""
    if isinstance(call.pattern.attend, Pyramid):
        return pyramid.run(call)
    if call.pattern.reads_content:
        sp = routed.split(call.pattern) if routed.USE_FAST else None
        if sp is not None:  # static part + routed key blocks (runtime/routed.py)
            return routed.run(call, sp)
    out, lse = _TileAttention.apply(call.q, call.k, call.v, call)
    return out.to(call.q.dtype), lse


# --------------------------------------------------------------------------------------------
# Head groups and kernel order
# --------------------------------------------------------------------------------------------

def _heads(call: Call, lo: int, hi: int | None) -> tuple[int, int, int, int, torch.Tensor | None]:
    """``(lo, hi, rows, G, kv_map)`` for query heads ``lo..hi``.

    ``G`` query heads share one gathered K/V (stacked as rows) when the range holds whole GQA
    groups; otherwise ``G = 1`` and ``kv_map`` lists the KV head of every query head.
    """
    hi = call.heads if hi is None else hi
    group = call.heads // call.kv_heads
    if lo % group == 0 and hi % group == 0:
        return lo, hi, (hi - lo) // group, group, None
    kv_map = torch.arange(lo, hi, device=call.q.device) // group
    return lo, hi, hi - lo, 1, kv_map


def _to_kernel(x: torch.Tensor, index: torch.Tensor, identity: bool) -> torch.Tensor:
    """``x [H, N, D]`` -> fp32 ``[H, positions, D]`` in kernel order; padding positions are zero."""
    x = x.float()
    if identity:
        return x.contiguous()
    # One gather (appending a zero row for padding to read would copy x once more), then the
    # few padding positions zeroed in place.
    n = x.shape[1]
    y = x.index_select(1, index.clamp(max=n - 1))
    pad = (index == n).nonzero().squeeze(1)
    return y.index_fill_(1, pad, 0.0) if len(pad) else y


def _from_kernel(x: torch.Tensor, inverse: torch.Tensor, identity: bool) -> torch.Tensor:
    return x if identity else x.index_select(1, inverse)


def _chunks(s: TileSchedule, rows: int, G: int) -> list[tuple[int, int]]:
    """Query-tile chunks ``(c0, c1)`` of about ``CHUNK_BYTES`` of fp32 scores (:func:`attnlang.rows.chunks`)."""
    return chunks(s.layout, rows * G, s.block_m, s.block_n, CHUNK_BYTES)


def _gather(s: TileSchedule, kk: torch.Tensor, vk: torch.Tensor, c0: int, c1: int, G: int):
    """Key/value tiles and bias of query tiles ``c0..c1``: ``[H, c, W*BN, D or Dv]`` and ``[1, c, G*BM, W*BN]``."""
    H = kk.shape[0]
    c, W, bm, bn = c1 - c0, s.layout.chunk_width(c0, c1), s.block_m, s.block_n
    idx = s.slots[c0:c1, :W].reshape(-1)
    step = s.layout.window_step(c0, c1)

    def tiles(x: torch.Tensor) -> torch.Tensor:  # K (head dim D) and V (head dim Dv) alike
        D = x.shape[-1]
        if step is not None:
            # Evenly spaced windows of consecutive tiles: a strided view, no copy.
            first = int(s.layout.window_start[c0]) * bn * D
            return x.as_strided((H, c, W * bn, D), (x.stride(0), step * bn * D, D, 1), x.storage_offset() + first)
        return x.view(H, -1, bn, D).index_select(1, idx).view(H, c, W * bn, D)

    kg, vg = tiles(kk), tiles(vk)
    key = (c0, c1, G)
    if key not in s.chunk_bias:
        bid = s.bias_id[c0:c1, :W]
        if not bool((bid > 0).any()):
            bias = None  # only full tiles: no mask work at all
        else:
            bias = s.bias.index_select(0, bid.reshape(-1)).view(c, W, bm, bn).transpose(1, 2).reshape(c, bm, W * bn)
            if G > 1:
                bias = bias.unsqueeze(1).expand(c, G, bm, W * bn).reshape(c, G * bm, W * bn)
            bias = bias.unsqueeze(0)
        if s.q_tiles * G * bm * s.width * bn * 4 > BIAS_CACHE_BYTES:
            return idx, kg, vg, bias
        s.chunk_bias[key] = bias  # small enough to keep with the plan: later calls skip the gather
    return idx, kg, vg, s.chunk_bias[key]


def _rows(x: torch.Tensor, c0: int, c1: int, G: int, bm: int) -> torch.Tensor:
    """``x [H, G, positions, E]`` -> query tiles ``c0..c1`` as ``[H, c, G*BM, E]``."""
    H, E = x.shape[0], x.shape[-1]
    t = x[:, :, c0 * bm:c1 * bm].reshape(H, G, c1 - c0, bm, E)
    return t.transpose(1, 2).reshape(H, c1 - c0, G * bm, E)


def _unrows(parts: list[torch.Tensor], G: int, bm: int) -> torch.Tensor:
    """Chunks ``[H, c, G*BM, E]`` -> ``[H*G, positions, E]`` (one copy for all chunks)."""
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    H, T, E = x.shape[0], x.shape[1], x.shape[-1]
    if G > 1:
        x = x.view(H, T, G, bm, E).transpose(1, 2)
    return x.reshape(H * G, T * bm, E)


# --------------------------------------------------------------------------------------------
# The autograd function
# --------------------------------------------------------------------------------------------

def _groups(call: Call):
    """``(b, schedule, lo, hi, rows, G, kv_map)`` for every batch item and head group."""
    for b in range(call.batch):
        plan = call.plan(b)
        inputs = call.item_inputs(b) if call.inputs else None
        for gi, g in enumerate(plan.groups):
            content = call.content(b) if call.pattern.reads_content else None  # route selections
            yield (b, schedule_for(plan, gi, inputs, call.q.device, content)) + _heads(call, g.lo, g.hi)


def _kernel_kv(call: Call, x: torch.Tensor, b: int, lo: int, hi: int, G: int, kv_map, s: TileSchedule):
    sel = x[b, lo // G:hi // G] if kv_map is None else x[b].index_select(0, kv_map)
    return _to_kernel(sel, s.k_index, s.identity)


class _TileAttention(torch.autograd.Function):
    """Plan-driven attention with a plan-driven backward (no N x N tensor anywhere)."""

    @staticmethod
    def forward(ctx, q, k, v, call: Call):
        B, Hq, N, D = q.shape
        Dv = v.shape[-1]
        out = q.new_empty((B, Hq, N, Dv), dtype=torch.float32)
        lse = q.new_empty((B, Hq, N), dtype=torch.float32)
        raw = torch.empty_like(lse)  # the chunk kernels' lse (0 on empty rows), for backward
        # NaN/Inf anywhere: every chunk excludes masked pairs exactly (slower; see chunk_forward).
        exact = not all_finite(q, k, v)
        with torch.no_grad():
            for b, s, lo, hi, rows, G, kv_map in _groups(call):
                qk = _to_kernel(q[b, lo:hi], s.q_index, s.q_identity).view(rows, G, -1, D)
                kk = _kernel_kv(call, k, b, lo, hi, G, kv_map, s)
                vk = _kernel_kv(call, v, b, lo, hi, G, kv_map, s)
                outs, lses = [], []
                for c0, c1 in _chunks(s, rows, G):
                    _, kg, vg, bias = _gather(s, kk, vk, c0, c1, G)
                    o, l = chunk_forward(_rows(qk, c0, c1, G, s.block_m), kg, vg, bias, call.scale, exact)
                    outs.append(o)
                    lses.append(l.unsqueeze(-1))
                ok, lk = _unrows(outs, G, s.block_m), _unrows(lses, G, s.block_m).squeeze(-1)
                out[b, lo:hi] = _from_kernel(ok.view(hi - lo, -1, Dv), s.q_inverse, s.q_identity)
                raw[b, lo:hi] = _from_kernel(lk.reshape(hi - lo, -1, 1), s.q_inverse, s.q_identity)[..., 0]
                fixed = lk.masked_fill(s.row_empty, float("-inf")).reshape(hi - lo, -1, 1)
                lse[b, lo:hi] = _from_kernel(fixed, s.q_inverse, s.q_identity)[..., 0]
        ctx.call, ctx.exact = call, exact
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, raw)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, raw = ctx.saved_tensors
        call: Call = ctx.call
        B, Hq, N, D = q.shape
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        if dout is None and dlse is None:
            return None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        # A NaN row's output sends NaN back through dO (e.g. a squared loss): exact again.
        exact = ctx.exact or not all_finite(dout, dlse)
        for b, s, lo, hi, rows, G, kv_map in _groups(call):
            view = lambda x: _to_kernel(x, s.q_index, s.q_identity).view(rows, G, -1, x.shape[-1])  # noqa: E731
            qk, ok, dok = view(q[b, lo:hi]), view(out[b, lo:hi]), view(dout[b, lo:hi])
            lk = view(raw[b, lo:hi].unsqueeze(-1))
            gk = None
            if dlse is not None:
                # Rows with no allowed key have lse = -inf whatever the scores: no gradient.
                gk = view(dlse[b, lo:hi].unsqueeze(-1)).masked_fill(s.row_empty.view(1, 1, -1, 1), 0.0)
            kk = _kernel_kv(call, k, b, lo, hi, G, kv_map, s)
            vk = _kernel_kv(call, v, b, lo, hi, G, kv_map, s)
            dqs = []
            dkk = torch.zeros_like(kk).view(kk.shape[0], -1, s.block_n, D)
            dvk = torch.zeros_like(vk).view(vk.shape[0], -1, s.block_n, vk.shape[-1])
            for c0, c1 in _chunks(s, rows, G):
                idx, kg, vg, bias = _gather(s, kk, vk, c0, c1, G)
                rows_of = lambda x: _rows(x, c0, c1, G, s.block_m)  # noqa: E731
                g = None if gk is None else rows_of(gk).squeeze(-1)
                dqc, dkg, dvg = chunk_backward(rows_of(dok), rows_of(qk), kg, vg, rows_of(ok),
                                                rows_of(lk).squeeze(-1), bias, call.scale, g, exact)
                dqs.append(dqc)
                dkk.index_add_(1, idx, dkg.reshape(kk.shape[0], -1, s.block_n, D))
                dvk.index_add_(1, idx, dvg.reshape(vk.shape[0], -1, s.block_n, vk.shape[-1]))
            dq[b, lo:hi] = _from_kernel(_unrows(dqs, G, s.block_m), s.q_inverse, s.q_identity)
            for acc, grad in ((dk, dkk), (dv, dvk)):
                g_user = _from_kernel(grad.view(grad.shape[0], -1, grad.shape[-1]), s.k_inverse, s.identity)
                if kv_map is None:
                    acc[b, lo // G:hi // G] += g_user
                else:
                    acc[b].index_add_(0, kv_map, g_user)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
