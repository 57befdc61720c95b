"""The `flex` backend and :func:`to_block_mask`: a Plan exported to PyTorch FlexAttention.

The plan's tables become ``BlockMask.from_kv_blocks(partial..., full..., BLOCK_SIZE=(block_m,
block_n), mask_mod=...)``; the ``mask_mod`` is generated from the Pattern IR (:func:`mask_mod`:
torch ops mirroring each primitive's ``allowed``, runtime inputs captured as tensors) and works
on the plan's kernel order by reading tokens through the order. Q/K/V are gathered into kernel
order (padding rows are zeros and never allowed), ``flex_attention`` runs, and the output is
scattered back to the user's order. For a static pattern the BlockMask and the order maps are
built once per (plan, device, heads) and reused by later calls (natural-order plans with no
padding skip the gather and scatter altogether).

Compilation: eager ``flex_attention`` evaluates the mask densely (fine for small N); for
``N >= COMPILE_MIN_N`` (or always, with ``COMPILE = True``; never with ``COMPILE = False``)
attnlang runs ``torch.compile(flex_attention)``, whose CPU code is Inductor's C++ flash template.
Its first call per shape compiles for a few seconds: attnlang then emits a one-time
``UserWarning`` ("attnlang: compiling FlexAttention ...") before it starts, so the wait is never
silent. The default CPU backend is the torch executor, so this cost is opt-in.

FlexAttention's compiled CPU path returns no ``lse``: ``return_lse=True`` with a compiled call is an
error naming the alternatives. FlexAttention's CPU path has no backward: asking for gradients with ``backend='flex'`` on CPU is
an :class:`~attnlang.errors.AttnError` that points to ``backend='torch'``.

NaN/Inf in Q/K/V: FlexAttention's ``P @ V`` multiplies masked entries by zero (``0 * NaN =
NaN``), so such calls run on the torch executor's exact path instead, with a one-time warning
(:func:`attnlang.runtime.dispatch.exact_fallback`); checking costs one pass over Q/K/V per call.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from attnlang.errors import AttnError
from attnlang.inputs import batch_of, check_inputs
from attnlang.pattern import (
    And, Axial, Block, Causal, Empty, Expr, Full, Grid, Halo, Keys, Layout, Neighborhood, Not, Or,
    Queries, Random, Range, Route, Same, Strided, Valid, Window, natten_window,
)
from attnlang.pattern import Pattern, Pyramid
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.runtime.call import Call
from attnlang.runtime.dispatch import exact_fallback
from attnlang.runtime.nonfinite import all_finite

COMPILE: bool | None = None  # None: compile when N >= COMPILE_MIN_N; True/False: always/never
COMPILE_MIN_N = 2048
_compiled: Callable | None = None
_warned: set[tuple] = set()
_PREPARED: dict[tuple, tuple] = {}  # (plan ids, device, heads) -> (BlockMask, index, inverse)

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# IR -> torch predicate (token indices in, bool out); mirrors each node's `allowed`
# --------------------------------------------------------------------------------------------

def _coords(layout: Layout, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for size in reversed(layout.sizes):
        out.append(x % size)
        x = x // size
    return out[::-1]


def _tmin(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return torch.clamp(a, max=b) if isinstance(b, int) else torch.minimum(a, b)


def _tmax(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    return torch.clamp(a, min=b) if isinstance(b, int) else torch.maximum(a, b)


def _in_sel(sel, x: torch.Tensor) -> torch.Tensor:
    if isinstance(sel, Range):
        return (x >= sel.lo) & (x < sel.hi)
    # Explicit lists are short: an OR of equalities traces into any mask_mod.
    out = x == int(sel.values[0])
    for v in sel.values[1:]:
        out = out | (x == int(v))
    return out


@dataclass(frozen=True)
class _Ctx:
    """What a mask_mod rule may read: the layout, batched runtime inputs, the device, and
    ``go`` to build a child's predicate (combinators)."""

    layout: Layout
    inputs: Mapping[str, torch.Tensor]
    device: Any
    go: Callable[[Expr], Callable]


def _all_axes(layout: Layout, per_axis: Callable[[int, list, list], torch.Tensor]) -> Callable:
    """``fn(b, q, k)``: the AND over axes of ``per_axis(a, q_coords, k_coords)``."""
    def f(b, q, k):
        qc, kc = _coords(layout, q), _coords(layout, k)
        ok = None
        for a in range(layout.rank):
            here = per_axis(a, qc, kc)
            ok = here if ok is None else ok & here
        return ok
    return f


def _mm_causal(e: Causal, c: _Ctx) -> Callable:
    if e.axis is None:
        return lambda b, q, k: k <= q
    a, layout = c.layout.index(e.axis), c.layout
    return lambda b, q, k: _coords(layout, k)[a] <= _coords(layout, q)[a]


def _mm_window(e: Window, c: _Ctx) -> Callable:
    lo, hi = e.before, e.after

    def win(b, q, k):
        d = k - q
        ok = (d >= -lo) if lo != float("inf") else (d == d)
        return ok & (d <= hi) if hi != float("inf") else ok
    return win


def _mm_random(e: Random, c: _Ctx) -> Callable:
    table = torch.from_numpy(e.table(c.layout)).to(c.device)
    return lambda b, q, k: table[q // e.block, k // e.block]


def _mm_neighborhood(e: Neighborhood, c: _Ctx) -> Callable:
    sizes = c.layout.sizes

    def axis(a, qc, kc):
        K, d, s, causal = e.window[a], e.dilation[a], e.stride[a], e.causal[a]
        # The one definition of the window (attnlang.pattern.natten_window), in torch ops.
        g, start, end = natten_window(qc[a], sizes[a], K, d, s, causal, minimum=_tmin, maximum=_tmax)
        kp = kc[a] // d
        return (kc[a] % d == g) & (kp >= start) & (kp < end)
    return _all_axes(c.layout, axis)


def _mm_block(e: Block, c: _Ctx) -> Callable:
    def axis(a, qc, kc):
        S, o = e.size[a], e.shift[a]
        return torch.div(qc[a] - o, S, rounding_mode="floor") == torch.div(kc[a] - o, S, rounding_mode="floor")
    return _all_axes(c.layout, axis)


def _mm_steps(steps: tuple[int, ...], c: _Ctx) -> Callable:
    return _all_axes(c.layout, lambda a, qc, kc: qc[a] % steps[a] == kc[a] % steps[a])


def _mm_axial(e: Axial, c: _Ctx) -> Callable:
    ax = c.layout.index(e.axis)
    return _all_axes(c.layout, lambda a, qc, kc: (qc[a] == kc[a]) | (a == ax))


def _mm_halo(e: Halo, c: _Ctx) -> Callable:
    def axis(a, qc, kc):
        B, h = e.block[a], e.halo[a]
        lo = (qc[a] // B) * B - h
        return (kc[a] >= lo) & (kc[a] < lo + B + 2 * h)
    return _all_axes(c.layout, axis)


def _mm_same(e: Same, c: _Ctx) -> Callable:
    ids = c.inputs[e.input]
    if ids.shape[0] == 1:  # one row for every batch item (to_block_mask with ids [N])
        return lambda b, q, k: ids[0, q] == ids[0, k]
    return lambda b, q, k: ids[b, q] == ids[b, k]


def _mm_valid(e: Valid, c: _Ctx) -> Callable:
    # Per-token flags [B, N] rather than the length [B]: Inductor's CPU template cannot
    # lower a captured scalar-per-batch buffer read as n[b] (measured: LoweringException).
    n = c.inputs[e.input]
    ok = torch.arange(c.layout.n, device=n.device)[None, :] < n[:, None]
    if ok.shape[0] == 1:  # one length for every batch item
        return lambda b, q, k: ok[0, q] & ok[0, k]
    return lambda b, q, k: ok[b, q] & ok[b, k]


def _mm_items(e: And | Or, c: _Ctx) -> Callable:
    fs = [c.go(it) for it in e.items]
    both = isinstance(e, And)

    def comb(b, q, k):
        out = fs[0](b, q, k)
        for f in fs[1:]:
            out = (out & f(b, q, k)) if both else (out | f(b, q, k))
        return out
    return comb


def _mm_not(e: Not, c: _Ctx) -> Callable:
    f = c.go(e.item)
    return lambda b, q, k: ~f(b, q, k)


# The flex mask_mod table: node type -> rule building ``fn(b, q_tok, k_tok) -> bool tensor``
# from torch ops that mirror the node's ``allowed``.
MASK_MOD: dict[type, Callable[[Any, _Ctx], Callable]] = {
    Full: lambda e, c: lambda b, q, k: (q >= 0) | True,
    Empty: lambda e, c: lambda b, q, k: (q < 0) & False,
    Causal: _mm_causal,
    Window: _mm_window,
    Keys: lambda e, c: lambda b, q, k: _in_sel(e.sel, k) & (q == q),
    Queries: lambda e, c: lambda b, q, k: _in_sel(e.sel, q) & (k == k),
    Random: _mm_random,
    Neighborhood: _mm_neighborhood,
    Block: _mm_block,
    Strided: lambda e, c: _mm_steps(e.step, c),
    Grid: lambda e, c: _mm_steps(e.steps(c.layout), c),  # strided(L / G)
    Axial: _mm_axial,
    Halo: _mm_halo,
    Same: _mm_same,
    Valid: _mm_valid,
    And: _mm_items,
    Or: _mm_items,
    Not: _mm_not,
}
MASK_MOD_LEAVES_OUT: dict[type, str] = {
    Route: "reads Q/K per call: supports() refuses it before a mask_mod is built",
}


def predicate(expr: Expr, layout: Layout, inputs: Mapping[str, torch.Tensor], device) -> Callable:
    """``fn(b, q_tok, k_tok) -> bool tensor``: the IR's ``allowed`` in torch ops (:data:`MASK_MOD`).

    ``inputs`` holds runtime inputs batched as ``ids [B, N]`` / ``length [B]`` tensors.
    """
    def go(e: Expr) -> Callable:
        rule = MASK_MOD.get(type(e))
        if rule is None:
            raise AttnError(f"the flex backend cannot express '{e.to_attn()}' as a mask_mod yet; "
                            "use backend='torch' for this pattern")
        return rule(e, ctx)

    ctx = _Ctx(layout, inputs, device, go)
    return go(expr)


def mask_mod(plan: Plan, head_group_of: torch.Tensor | None, inputs: Mapping[str, torch.Tensor],
             device) -> MaskMod:
    """The plan's ``mask_mod(b, h, q_idx, kv_idx)`` over kernel positions.

    Positions are mapped to tokens through the plan's order (padding is never allowed); with
    several head groups, ``head_group_of[h]`` selects each head's branch.
    """
    layout = plan.pattern.layout
    preds = [predicate(plan.pattern.expr_for_head(g.lo), layout, inputs, device) for g in plan.groups]
    n = plan.n
    order = None if plan.order is None else torch.as_tensor(plan.order, dtype=torch.int64, device=device)

    def mm(b, h, q_idx, kv_idx):
        if order is None:
            qt, kt = q_idx, kv_idx
            real = (q_idx < n) & (kv_idx < n)
        else:
            size = order.shape[0]
            qt = order[torch.clamp(q_idx, max=size - 1)]
            kt = order[torch.clamp(kv_idx, max=size - 1)]
            real = (q_idx < size) & (kv_idx < size) & (qt >= 0) & (kt >= 0)
        qt, kt = torch.clamp(qt, 0, n - 1), torch.clamp(kt, 0, n - 1)
        out = preds[0](b, qt, kt)
        for i, p in enumerate(preds[1:], start=1):
            out = torch.where(head_group_of[h] == i, p(b, qt, kt), out)
        return out & real

    return mm


# --------------------------------------------------------------------------------------------
# Plans -> BlockMask
# --------------------------------------------------------------------------------------------

def block_mask(plans: list[Plan], heads: int, inputs: Mapping[str, torch.Tensor], device):
    """One BlockMask for a batch of plans (one per batch item, or one shared) over ``heads``."""
    from torch.nn.attention.flex_attention import BlockMask

    p0 = plans[0]
    length = padded_length(p0)
    group_of = np.zeros(heads, dtype=np.int64)
    for i, g in enumerate(p0.groups):
        group_of[g.lo:(heads if g.hi is None else g.hi)] = i
    per_head = len(p0.groups) > 1

    def tables(kind: str):
        counts, idx = [], []
        for plan in plans:
            per_group = [getattr(g, kind).padded() for g in plan.groups]
            counts.append([per_group[group_of[h]][0] for h in (range(heads) if per_head else [0])])
            idx.append([per_group[group_of[h]][1] for h in (range(heads) if per_head else [0])])
        # FlexAttention sizes its transposed tables from the last dim: one column per key tile.
        # Query tiles past the plan's (padding only) visit nothing.
        rows, width = length // p0.block_m, length // p0.block_n
        dense = np.zeros((len(plans), len(idx[0]), rows, width), dtype=np.int32)
        num = np.zeros((len(plans), len(idx[0]), rows), dtype=np.int32)
        for b, row in enumerate(idx):
            for h, t in enumerate(row):
                dense[b, h, :t.shape[0], :t.shape[1]] = t
                num[b, h, :t.shape[0]] = counts[b][h]
        return torch.from_numpy(num).to(device), torch.from_numpy(dense).to(device)

    kv_num, kv_idx = tables("partial")
    full_num, full_idx = tables("full")
    hg = torch.from_numpy(group_of).to(device)
    mm = mask_mod(p0, hg, inputs, device)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(p0.block_m, p0.block_n),
                                    mask_mod=mm, seq_lengths=(length, length))


def padded_length(plan: Plan) -> int:
    """Kernel positions padded to whole query and key tiles (FlexAttention wants one length)."""
    step = math.lcm(plan.block_m, plan.block_n)
    return -(-plan.n_kernel // step) * step


def to_block_mask(p: Pattern, *, B: int | None = None, H: int | None = None,
                  inputs: Mapping[str, Any] | None = None):
    """A FlexAttention ``BlockMask`` for a bound pattern (:func:`attnlang.to_block_mask` takes any
    spec and resolves it first), planned without evaluating the N x N mask.

    The mask is in the user's (natural) token order, so it drops into existing FlexAttention code.
    ``B``/``H`` size the mask's batch and head dims (default 1: broadcast). Patterns with runtime
    inputs take ``inputs={"doc": ids [B, N] or [N], "len": lengths [B] or one length}``: batched
    inputs give one plan per batch item and set the batch (``B`` may be left out); unbatched ones
    give one plan that every batch item shares, so the mask serves queries of any batch size.

    >>> import attnlang
    >>> bm = attnlang.to_block_mask(attnlang.causal & attnlang.sliding(256), tokens=4096)
    >>> bm.shape
    (1, 1, 4096, 4096)
    """
    heads = H or p.heads or 1
    if p.heads is not None and heads != p.heads:
        raise AttnError(f"pattern '{p.name}' declares heads {p.heads} but H = {heads} was asked for")
    # Batched inputs (ids [B, N], lengths [B]) give one plan per item and fix the batch; unbatched
    # ones (ids [N], a length) give one plan shared by every item, broadcast over any B.
    tin = {k: torch.from_numpy(a) for k, a in check_inputs(p, inputs).items()}
    batch = batch_of(tin)
    if B is not None and batch != 1 and B != batch:
        raise AttnError(f"runtime inputs have batch {batch} but B = {B}",
                        hint=f"leave B out (it is taken from the inputs) or pass B = {batch}")
    items = range(batch) if tin else range(1)
    plans = [make_plan(p, inputs={k: v[min(b, v.shape[0] - 1)].numpy() for k, v in tin.items()} or None,
                       order="natural") for b in items]
    # Unbatched inputs stay one row: the mask_mod reads row 0 for every batch index.
    bm = block_mask(plans, heads if len(plans[0].groups) > 1 else 1, tin, "cpu")
    if B and B > 1 and batch == 1:
        bm = _expand_batch(bm, B)
    if H and len(plans[0].groups) == 1 and H > 1:
        bm = _expand_heads(bm, H)
    return bm


def _expand_batch(bm, B: int):
    return type(bm).from_kv_blocks(*(t.expand(B, *t.shape[1:]).contiguous() for t in
                                     (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)),
                                   BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)


def _expand_heads(bm, H: int):
    return type(bm).from_kv_blocks(*(t.expand(t.shape[0], H, *t.shape[2:]).contiguous() for t in
                                     (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)),
                                   BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------

def _needs_grad(call: Call) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))


def supports(call: Call) -> str | None:
    if isinstance(call.pattern.attend, Pyramid):
        return ("pyramid(...) pools keys, which a FlexAttention mask cannot express: "
                "use backend='torch'")
    if call.pattern.reads_content:
        return ("route(...) selects blocks from Q/K per call, which the flex bridge does not plan "
                "yet: use backend='torch' (bench/routed.py shows feeding the selection to a BlockMask)")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return "this torch has no FlexAttention (needs torch >= 2.5)"
    if call.q.device.type == "cpu" and _needs_grad(call):
        return ("FlexAttention's CPU path has no backward, and these tensors require grad: "
                "use backend='torch' for training on CPU, or run under torch.no_grad()")
    return None


def _flex(n: int) -> Callable:
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    compile_now = COMPILE if COMPILE is not None else n >= COMPILE_MIN_N
    if not compile_now:
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)`` via FlexAttention.

    ``lse`` is None when the caller does not want it (``call.want_lse``); compiled CPU
    FlexAttention cannot produce it at all, which is an error when it is asked for.
    """
    from torch.nn.attention.flex_attention import AuxRequest

    why = supports(call)
    if why:
        raise AttnError(f"backend 'flex' cannot run this call: {why}")
    if not all_finite(call.q, call.k, call.v):
        # FlexAttention computes P @ V (and dQ) with masked entries as 0 * x: a NaN value no
        # row may see would still reach every row of its block.
        return exact_fallback(call, "flex", "FlexAttention would leak them into rows that may not "
                              "see them (0 * NaN in P @ V)")
    plans = [call.plan(b) for b in (range(call.batch) if call.inputs else range(1))]
    p0 = plans[0]
    if any(p.block_m != p0.block_m or p.block_n != p0.block_n or p.n_kernel != p0.n_kernel
           for p in plans):
        raise AttnError("the batch items' plans differ in tile shape or order length, which one "
                        "BlockMask cannot hold: use backend='torch'")
    bm, index, inverse = _prepared(plans, call)
    length = padded_length(p0)
    q, k, v = (call.q, call.k, call.v) if index is None else (_gather(t, index) for t in (call.q, call.k, call.v))
    fn = _flex(length)
    on_cpu_compiled = fn is _compiled and call.q.device.type == "cpu"
    if on_cpu_compiled and call.want_lse:
        raise AttnError("compiled FlexAttention on CPU cannot return lse (an Inductor limitation): "
                        "use backend='torch' for return_lse=True, or set "
                        "attnlang.runtime.flex.COMPILE = False for small sizes")
    key = (tuple(q.shape), tuple(k.shape), q.dtype)
    if fn is _compiled and key not in _warned:
        _warned.add(key)
        warnings.warn(f"attnlang: compiling FlexAttention for shape {tuple(q.shape)} {q.dtype} "
                      "(a few seconds, once per shape)", stacklevel=3)
    with warnings.catch_warnings():
        # Eager flex on small sizes is deliberate here (compiling would cost more than it saves).
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        res = fn(q, k, v, block_mask=bm, scale=call.scale, enable_gqa=call.kv_heads != call.heads,
                 return_aux=AuxRequest(lse=True) if call.want_lse else None)
    out, aux = res if call.want_lse else (res, None)
    if inverse is None:
        return out.to(call.q.dtype), None if aux is None else aux.lse.float()
    lse = None if aux is None else aux.lse.float().index_select(2, inverse)
    return out.index_select(2, inverse).to(call.q.dtype), lse


def _prepared(plans: list[Plan], call: Call):
    """``(BlockMask, gather index, inverse)`` of a call, cached per (plan, device, heads).

    Building the BlockMask costs O(tiles) of numpy and tensor copies (about 0.2 s at N = 4096
    with 8 heads, measured), as much as the attention itself; a static pattern's plan lives with
    its ``Compiled``, so later calls reuse it. Patterns with runtime inputs get fresh plans per
    call (and their mask_mod captures that call's inputs): those are never cached.
    """
    p0 = plans[0]
    heads = call.heads if len(p0.groups) > 1 else 1
    key = (tuple(id(p) for p in plans), str(call.q.device), heads)
    hit = None if call.inputs else _PREPARED.get(key)
    if hit is None:
        # Contiguous copies: Inductor's CPU template rejects captured buffers with zero strides
        # (what expanding an input to the batch gives).
        inputs = {k: t.contiguous() for k, t in call.inputs.items()}
        bm = block_mask(plans, heads, inputs, call.q.device)
        length = padded_length(p0)
        # Natural order without padding: tensors go in as they are (no gather, no scatter).
        maps = (None, None) if p0.order is None and length == p0.n else _order_maps(p0, length, call.q.device)
        hit = (bm,) + maps
        if not call.inputs:
            _PREPARED[key] = hit
            # Drop the entry with the plan: ids are reused once an object dies.
            weakref.finalize(p0, _PREPARED.pop, key, None)
    return hit


def _order_maps(plan: Plan, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = np.full(length, plan.n, dtype=np.int64)
    src = np.arange(plan.n) if plan.order is None else np.where(plan.order >= 0, plan.order, plan.n)
    pos[:len(src)] = src
    inv = np.empty(plan.n, dtype=np.int64)
    real = pos < plan.n
    inv[pos[real]] = np.nonzero(real)[0]
    return torch.from_numpy(pos).to(device), torch.from_numpy(inv).to(device)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, H, N, D]`` in kernel order; padding positions read a zero row."""
    pad = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([x, pad], dim=2).index_select(2, index).contiguous()
