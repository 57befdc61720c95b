"""A standalone Python module from a Plan: kernels, index tables, launcher and autograd.

:func:`generate_module` returns the text of one ``.py`` file that imports only ``torch``,
``triton`` and the standard library and defines::

    attention(q, k, v, scale=None, return_lse=False, **runtime_inputs)

for ``q [B, H, N, D]``, ``k``/``v [B, Hkv, N, D]`` (GQA when ``Hkv`` divides ``H``), fp16, bf16
or fp32, head dims up to 256, differentiable through a ``torch.autograd.Function``. Small index
tables are inlined (as lists, or zlib + base64 when larger); tables over
``SIDECAR_BYTES`` go to a sidecar ``NAME.tables.bin`` next to the module.

The runtime ``triton`` backend imports exactly this text from its on-disk cache, so what a user
vendors is what the tests run.

>>> from attnlang.pattern import Pattern, causal, sliding
>>> from attnlang.plan import Plan
>>> p = Pattern.create(causal & sliding(8), tokens=64, name="swa")
>>> m = generate_module(Plan.from_mask(p, p.mask(), 16, 16))
>>> "def attention(q, k, v, scale=None, return_lse=False, **runtime_inputs):" in m.source
True
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import textwrap
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from attnlang.codegen.triton import Kernels, Table, generate_kernels
from attnlang.errors import AttnError, did_you_mean
from attnlang.pattern import (
    And, ByHead, Empty, Expr, Full, HeadRange, Not, Or, Pattern, Same, Valid, and_, not_, or_,
)
from attnlang.plan import BlockTable, HeadGroup, Plan
from attnlang.version import __version__

TARGETS = ("h100", "h200", "b200", "a100", "cpu")

# (num_warps, num_stages) candidates per target; block sizes are fixed by the plan.
TARGET_CONFIGS: dict[str, list[tuple[int, int]]] = {
    "h100": [(4, 2), (4, 3), (8, 2), (8, 3)],
    "h200": [(4, 2), (4, 3), (8, 2), (8, 3)],
    "b200": [(4, 2), (4, 3), (8, 2), (8, 3)],
    "a100": [(4, 2), (4, 3), (8, 2)],
    "cpu": [(4, 1)],
}

DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256
INLINE_LIST_MAX = 64  # tables up to this many entries are written as Python lists
SIDECAR_BYTES = 1 << 22  # beyond this many raw table bytes, write a sidecar file


@dataclass(frozen=True)
class ModuleText:
    """A generated module: its source, and the sidecar bytes it reads (``None`` if inline)."""

    name: str
    source: str
    sidecar: bytes | None = None
    kernels: Kernels | None = field(default=None, compare=False, repr=False)  # what it was made from

    @property
    def sidecar_name(self) -> str:
        return f"{self.name}.tables.bin"


def module_name(name: str) -> str:
    """A Python identifier for a pattern name (the generated module's file stem)."""
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return s if s and not s[0].isdigit() else f"p_{s}"


def check_target(target: str) -> str:
    """Normalise a target name; unknown names are an AttnError listing the valid ones."""
    t = str(target).lower()
    if t not in TARGETS:
        raise AttnError(f"unknown target '{target}'{did_you_mean(t, TARGETS)}",
                        hint=f"valid targets: {', '.join(TARGETS)}")
    return t


def check_head_dim(head_dim: int | None) -> int | None:
    if head_dim is None:
        return None
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise AttnError(f"head dim {head_dim!r} is not supported by the triton kernels",
                        hint=f"valid: an integer in 1..{MAX_HEAD_DIM} (padded to a power of two >= 16)")
    return head_dim


def check_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    names = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    d = names.get(str(dtype), str(dtype))
    if d not in DTYPES:
        raise AttnError(f"dtype '{dtype}' is not supported by the triton kernels",
                        hint="valid: float16 (fp16), bfloat16 (bf16), float32 (fp32)")
    return d


# --------------------------------------------------------------------------------------------
# Plans for patterns that read runtime inputs: one static envelope for every input value
# --------------------------------------------------------------------------------------------

def _substitute(e: Expr, values: Mapping[Expr, bool]) -> Expr:
    if e in values:
        return Full() if values[e] else Empty()
    if isinstance(e, And):
        return and_(*(_substitute(i, values) for i in e.items))
    if isinstance(e, Or):
        return or_(*(_substitute(i, values) for i in e.items))
    if isinstance(e, Not):
        return not_(_substitute(e.item, values))
    return e


def envelope_patterns(pattern: Pattern) -> list[Pattern]:
    """Static patterns whose union of tiles covers every value of the runtime inputs.

    Each ``same``/``valid`` node is replaced by ``full`` or ``none`` in every combination: for a
    fixed (q, k) each node is one of the two, so the true mask is inside the union, and a tile
    full in every combination is full whatever the inputs are.
    """
    exprs = [e for _, _, e in pattern.exprs()]
    nodes = sorted({n for e in exprs for n in e.walk() if isinstance(n, (Same, Valid))}, key=repr)
    out = []
    for bits in itertools.product((True, False), repeat=len(nodes)):
        vals = dict(zip(nodes, bits))
        if isinstance(pattern.attend, ByHead):
            attend: Any = ByHead(tuple(HeadRange(b.lo, b.hi, _substitute(b.expr, vals))
                                       for b in pattern.attend.branches))
        else:
            attend = _substitute(pattern.attend, vals)
        out.append(dataclasses.replace(pattern, attend=attend, inputs=()))
    return out


def module_plan(pattern: Pattern, planner: Callable[[Pattern], Plan]) -> Plan:
    """The plan a generated module runs: ``planner(pattern)``, or for patterns with runtime
    inputs the envelope of :func:`envelope_patterns` (every visited tile partial unless it is
    full for every input value). This is what ``attnlang compile`` writes, since a standalone
    module has no planner; the runtime ``triton`` backend instead passes each call's exact
    per-batch-item tables (``generate_module(..., per_call=True)``)."""
    if not pattern.inputs:
        return planner(pattern)
    plans = [planner(p) for p in envelope_patterns(pattern)]
    first = plans[0]
    same_shape = all(p.block_m == first.block_m and p.block_n == first.block_n
                     and _same_order(p.order, first.order) and len(p.groups) == len(first.groups)
                     for p in plans)
    if not same_shape:
        # The planner chose different tilings per combination: fall back to the dense oracle
        # at the first one's tiling (O(N^2), only reached for small N in practice).
        plans = [Plan.from_mask(p, p.mask(), first.block_m, first.block_n, first.order, first.tile_q,
                                first.tile_kv) for p in envelope_patterns(pattern)]
    groups = []
    for gi, g in enumerate(first.groups):
        visited = None
        full = None
        for p in plans:
            m = p.tile_map(p.groups[gi].lo)
            visited = (m > 0) if visited is None else visited | (m > 0)
            full = (m == 2) if full is None else full & (m == 2)
        groups.append(HeadGroup.of(g.lo, g.hi, BlockTable.from_dense(visited & ~full), BlockTable.from_dense(full)))
    notes = first.notes + (f"runtime inputs {[i.name for i in pattern.inputs]}: static envelope over "
                           f"{len(plans)} input cases; the predicate reads the inputs in partial tiles",)
    return Plan(pattern, first.block_m, first.block_n, first.tile_q, first.tile_kv, first.order,
                tuple(groups), notes, None)


def _same_order(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


# --------------------------------------------------------------------------------------------
# The module text
# --------------------------------------------------------------------------------------------

def _encode(t: Table) -> str:
    dtype = "int8" if t.data.dtype == np.int8 else "int32"
    data = np.ascontiguousarray(t.data, dtype=np.dtype(dtype).newbyteorder("<"))
    if data.size <= INLINE_LIST_MAX:
        return f"({dtype!r}, {data.tolist()!r})"
    raw = base64.b64encode(zlib.compress(data.tobytes(), 9)).decode()
    lines = textwrap.wrap(raw, 92)
    body = "\n".join(f"        {ln!r}" for ln in lines)
    return f"({dtype!r}, (\n{body}))"


def _plan_summary(plan: Plan) -> list[str]:
    out = []
    for g in plan.groups:
        s = plan.stats(g.lo)
        who = "all heads" if g.hi is None else f"heads {g.lo}..{g.hi}"
        line = (f"{who}: {s['visited']} of {plan.q_tiles * plan.kv_tiles} tiles visited "
                f"({s['full']} full, {s['partial']} partial), tile bound {s['tile_bound']:.2f}x")
        out.append(line)
    return out


def generate_module(plan: Plan, name: str | None = None, target: str = "h100",
                    head_dim: int | None = None, dtype: str | None = None,
                    version: str | None = None, per_call: bool = False) -> ModuleText:
    """Generate the standalone module for ``plan`` (see the module docstring).

    ``head_dim``/``dtype``, when given, are checked by the module at call time (otherwise any
    supported head dim and dtype runs); ``target`` picks the autotune candidates.

    ``per_call``: the tile tables are arguments of every call (``attention_tables(q, k, v,
    tables, ...)`` with the arrays of :func:`attnlang.codegen.triton.call_arrays`), not part of
    the module: what the runtime backend uses for runtime-input and routed patterns, whose
    tables change per call. Such a module needs attnlang's planner to be called, so ``attnlang
    compile`` writes envelope modules (:func:`module_plan`) instead.
    """
    target = check_target(target)
    head_dim = check_head_dim(head_dim)
    dtype = check_dtype(dtype)
    version = version or __version__
    pattern = plan.pattern
    name = name or pattern.name
    k = generate_kernels(plan, per_call)
    total = sum(t.data.nbytes for t in k.tables)
    sidecar = None
    if total > SIDECAR_BYTES:
        tables_src, sidecar = _sidecar(k)
    else:
        tables_src = "_TABLES = {\n" + "".join(
            f"    # {t.why}\n    {t.name!r}: {_encode(t)},\n" for t in k.tables) + "}\n"
    params = ", ".join(f"{a} = {v!r}" for a, v in pattern.params) or "(none)"
    header = [
        f"# {name}.py: attention kernels generated by attnlang {version} for pattern '{pattern.name}'.",
        "# Do not edit: regenerate with `attnlang compile`. Needs only torch and triton (>= 3.2).",
        "#",
        "# Pattern:",
        *("#   " + ln for ln in pattern.to_attn().rstrip("\n").splitlines()),
        f"# Parameters: {params}",
        f"# Plan: N = {plan.n} tokens ({plan.n_kernel} kernel positions), tiles {plan.block_m} x {plan.block_n}, "
        f"{'natural order' if plan.order is None else 'permuted token order'}",
        *(("#   tile tables: passed per call (planned per batch item"
           + (" and query head, from the routing stage)" if pattern.reads_content else ")"),) if per_call
          else ("#   " + ln for ln in _plan_summary(plan))),
        *("#   note: " + n for n in plan.notes + tuple(k.notes)),
        f"# Target: {target}",
    ]
    inputs = {i.name: i.kind for i in pattern.inputs}
    kargs = "\n        ".join(f"    {n!r}: {a!r}," for n, a in k.args.items())
    consts = textwrap.dedent(f'''\
        ATTNLANG_VERSION = {version!r}
        PATTERN_NAME = {pattern.name!r}
        TARGET = {target!r}
        N_TOKENS = {plan.n}  # tokens per sequence (the N of q/k/v)
        N_KERNEL = {plan.n_kernel}  # positions the kernels run over (>= N_TOKENS when the order pads)
        BLOCK_M = {plan.block_m}  # query tile, tokens
        BLOCK_N = {plan.block_n}  # key tile, tokens
        Q_TILES = {plan.q_tiles}
        KV_TILES = {plan.kv_tiles}
        HEADS = {pattern.heads!r}  # query heads the pattern declares (None: any)
        HEAD_GROUPS = {[(g.lo, g.hi) for g in plan.groups]!r}
        RUNTIME_INPUTS = {inputs!r}  # name -> "ids" ([B, N] or [N] ints) | "length" ([B] or scalar)
        HEAD_DIM = {head_dim!r}  # compiled for this head dim only (None: any in 1..{MAX_HEAD_DIM})
        DTYPE = {dtype!r}  # compiled for this dtype only (None: float16, bfloat16 or float32)
        KERNEL_ARGS = {{  # table and runtime-input arguments of each kernel, in order
        {kargs}
        }}
        CALL_TABLES = {k.call_tables!r}  # arrays passed per call to attention_tables (empty: none)
        _TARGET_CONFIGS = {TARGET_CONFIGS[target]!r}  # (num_warps, num_stages) autotune candidates
        ''')
    src = "\n".join(header) + "\n" + _DOC.format(name=pattern.name) + _IMPORTS + "\n" + consts + "\n" \
        + tables_src + "\n" + _CONFIGS + "\n\n" + k.source + "\n\n" + _LAUNCHER
    return ModuleText(name, src, sidecar, k)


def _sidecar(k: Kernels) -> tuple[str, bytes]:
    index = []
    chunks = []
    off = 0
    for t in k.tables:
        dtype = "int8" if t.data.dtype == np.int8 else "int32"
        raw = np.ascontiguousarray(t.data, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        chunks.append(raw)
        index.append(f"    # {t.why}\n    {t.name!r}: ({dtype!r}, {off}, {len(raw)}),\n")
        off += len(raw)
    blob = zlib.compress(b"".join(chunks), 6)
    src = ("# The index tables are large: they live in the sidecar file NAME.tables.bin next to this\n"
           "# module (zlib-compressed little-endian arrays); name -> (dtype, byte offset, byte length).\n"
           "# _SIDECAR is the SHA-256 of that file: a stale or damaged sidecar is refused, never used.\n"
           f"_SIDECAR = {hashlib.sha256(blob).hexdigest()!r}\n_TABLES = {{\n" + "".join(index) + "}\n")
    return src, blob


_DOC = '''"""Attention for pattern `{name}`: ``attention(q, k, v, scale=None, return_lse=False, **runtime_inputs)``.

q: [B, H, N, D]; k, v: [B, Hkv, N, D] with H % Hkv == 0 (GQA); float16, bfloat16 or float32 on
a CUDA device (or on CPU under TRITON_INTERPRET=1). Returns out [B, H, N, D] (and lse [B, H, N],
fp32, natural log, -inf for rows with no allowed key, when return_lse=True). Differentiable.
"""
'''

_IMPORTS = '''import base64
import hashlib
import math
import os
import zlib

import torch
import triton
import triton.language as tl
'''

_CONFIGS = '''def _configs():
    # The interpreter (TRITON_INTERPRET=1, CPU tests) cannot time configs: give it exactly one.
    # Reading an environment variable is fine at import; no driver is queried here.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in _TARGET_CONFIGS]
'''

_LAUNCHER = '''
# ------------------------------------------------------------------------------------------
# Launcher and autograd
# ------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DEVICE_TABLES = {}


def _host_tables():
    out = {}
    if globals().get("_SIDECAR"):
        path = os.path.splitext(os.path.abspath(__file__))[0] + ".tables.bin"
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != _SIDECAR:  # not the tables this module was made with
            raise RuntimeError(f"{path} does not match {os.path.basename(__file__)} (SHA-256 differs): "
                               "regenerate the module and its tables together with `attnlang compile`")
        blob = zlib.decompress(data)
        for name, (dtype, off, size) in _TABLES.items():
            out[name] = torch.frombuffer(bytearray(blob[off:off + size]), dtype=getattr(torch, dtype))
        return out
    for name, (dtype, data) in _TABLES.items():
        if isinstance(data, str):  # zlib + base64 of little-endian values
            raw = zlib.decompress(base64.b64decode(data))
            out[name] = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype))
        else:
            out[name] = torch.tensor(data, dtype=getattr(torch, dtype))
    return out


def _tables(device):
    # Uploaded once per device and kept: the tables are part of the compiled pattern.
    key = str(device)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = {n: t.to(device) for n, t in _host_tables().items()}
    return _DEVICE_TABLES[key]


def _all_finite(*tensors):
    # aminmax propagates NaN and shows +-inf in one pass (isfinite(x).all() builds a mask).
    # Under CUDA graph capture no host sync is allowed: the inputs are taken as finite.
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    ends = [torch.stack(torch.aminmax(t)).float() for t in tensors if t.numel()]
    return not ends or bool(torch.isfinite(torch.cat(ends)).all())


def _meta(head_dim, v_dim, dtype, exact=False):
    return dict(N_TOKENS=N_TOKENS, N_KERNEL=N_KERNEL, KV_TILES=KV_TILES, BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                V_DIM=v_dim, BLOCK_DV=max(16, triton.next_power_of_2(v_dim)),
                # fp32 inputs get exact fp32 products, not TF32
                PRECISION="ieee" if dtype == torch.float32 else "tf32",
                # NaN/Inf in the inputs: the kernels' exact variant keeps hidden values out of
                # every row (masked products would give 0 * NaN); compiled only when needed
                EXACT=exact)


def _args(kernel, tables, inputs):
    # inputs: runtime inputs (IN_<name>) and per-call tables; tables: this module's own
    return [inputs[n] if n in inputs else tables[n] for n in KERNEL_ARGS[kernel]]


def _forward(q, k, v, scale, inputs, exact):
    B, H, N, D = q.shape
    gqa = H // k.shape[1]
    o = q.new_empty((B, H, N, v.shape[3]))  # the value head dim (MLA: it may differ from D)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    t = _tables(q.device)
    _attn_fwd[(Q_TILES, B * H)](q, k, v, o, lse, *_args("_attn_fwd", t, inputs), scale * _LOG2E, H, gqa,
                               **_meta(D, v.shape[3], q.dtype, exact))
    return o, lse


def _backward(q, k, v, o, lse, do, dlse, scale, inputs, exact):
    B, H, N, D = q.shape
    gqa = H // k.shape[1]
    do = torch.zeros_like(o) if do is None else do.contiguous()
    delta = torch.empty_like(lse)
    rows = B * H * N
    Dv = v.shape[3]
    _attn_bwd_preprocess[(triton.cdiv(rows, 64),)](o, do, delta, rows, HEAD_DIM=Dv,
                                                   BLOCK_D=max(16, triton.next_power_of_2(Dv)), BLOCK_R=64)
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so a loss reading lse adds P * dlse to dS = P * (dP - delta):
        # the same kernels with delta - dlse. Rows with lse = -inf have P = 0 and take no part.
        delta = delta - torch.where(torch.isinf(lse), 0.0, dlse.float())
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    t = _tables(q.device)
    meta = _meta(D, Dv, q.dtype, exact or not _all_finite(do))
    _attn_bwd_dkdv[(KV_TILES, B * k.shape[1])](q, k, v, do, dk, dv, lse, delta, *_args("_attn_bwd_dkdv", t, inputs),
                                               scale * _LOG2E, scale, H, gqa, **meta)
    _attn_bwd_dq[(Q_TILES, B * H)](q, k, v, do, dq, lse, delta, *_args("_attn_bwd_dq", t, inputs),
                                   scale * _LOG2E, scale, H, gqa, **meta)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, inputs):
        exact = not _all_finite(q, k, v)
        o, lse = _forward(q, k, v, scale, inputs, exact)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.inputs, ctx.exact = scale, inputs, exact
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero pass
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, dlse, ctx.scale, ctx.inputs, ctx.exact)
        return dq, dk, dv, None, None


def _check(q, k, v, runtime_inputs):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch.Tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES.values():
        raise TypeError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if DTYPE is not None and q.dtype != _DTYPES[DTYPE]:
        raise TypeError(f"this module was compiled for {DTYPE}, got {q.dtype}")
    B, H, N, D = q.shape
    if N != N_TOKENS or k.shape[2] != N_TOKENS or v.shape[:3] != k.shape[:3] or k.shape[0] != B:
        raise ValueError(f"pattern {PATTERN_NAME} has N = {N_TOKENS} tokens: need q [B, H, {N_TOKENS}, D] and "
                         f"k, v [B, Hkv, {N_TOKENS}, D / Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"q head dim {D} and k head dim {k.shape[3]} differ")
    if not 1 <= D <= 256 or (HEAD_DIM is not None and D != HEAD_DIM):
        raise ValueError(f"head dim {D} is not supported; valid: " + (str(HEAD_DIM) if HEAD_DIM else "1..256"))
    if not 1 <= v.shape[3] <= 256:  # the value head dim may differ from D (MLA)
        raise ValueError(f"value head dim {v.shape[3]} is not supported; valid: 1..256")
    if H == 0 or k.shape[1] == 0:
        raise ValueError(f"attention needs at least one head: q has {H} heads, k/v have {k.shape[1]}")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k.shape[1]} key/value heads")
    if HEADS is not None and H != HEADS:
        raise ValueError(f"pattern {PATTERN_NAME} declares {HEADS} heads, q has {H}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    unknown = sorted(set(runtime_inputs) - set(RUNTIME_INPUTS))
    missing = sorted(set(RUNTIME_INPUTS) - set(runtime_inputs))
    if unknown or missing:
        raise TypeError(f"runtime inputs: expected {sorted(RUNTIME_INPUTS)}, missing {missing}, unknown {unknown}")
    inputs = {}
    for name, kind in RUNTIME_INPUTS.items():
        t = torch.as_tensor(runtime_inputs[name], device=q.device)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"runtime input {name} must be an integer tensor, got {t.dtype}")
        # The same checks and words as attnlang's own call (runtime/call.py), never a raw torch error
        if kind == "ids":
            if t.dim() == 1 and t.shape[0] == N:
                t = t.expand(B, N)
            if tuple(t.shape) != (B, N):
                raise ValueError(f"runtime input '{name}' (ids) must have shape [B, N] = [{B}, {N}] or [N], "
                                 f"got {tuple(t.shape)}")
        else:
            if t.dim() == 0:
                t = t.expand(B)
            if tuple(t.shape) != (B,):
                raise ValueError(f"runtime input '{name}' (length) must have shape [B] = [{B}] or be a "
                                 f"scalar, got {tuple(t.shape)}")
            if bool(((t < 0) | (t > N)).any()):
                raise ValueError(f"runtime input '{name}' (length) must lie in 0..{N}, got {t.tolist()}")
        if kind == "ids":  # compared for equality at full width: ids 0 and 2**32 are two documents
            inputs["IN_" + name] = t.to(torch.int64).contiguous()
        else:  # checked to lie in 0..N above, so int32 holds it
            inputs["IN_" + name] = t.to(torch.int32).contiguous()
    return inputs


def attention(q, k, v, scale=None, return_lse=False, **runtime_inputs):
    """Attention restricted to the pattern; see the module docstring."""
    if CALL_TABLES:
        raise TypeError(f"pattern {PATTERN_NAME}: this module takes its tile tables per call; use "
                        "attention_tables(q, k, v, tables, ...) or attnlang's triton backend")
    inputs = _check(q, k, v, runtime_inputs)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = _Attention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, inputs)
    return (o, lse) if return_lse else o


def attention_tables(q, k, v, tables, scale=None, return_lse=False, **runtime_inputs):
    """``attention`` with this call's tile tables (``CALL_TABLES``: name -> int tensor on q's
    device, as attnlang.codegen.triton.call_arrays builds them for the batch of q)."""
    if sorted(tables) != sorted(CALL_TABLES):
        raise TypeError(f"tables: expected {sorted(CALL_TABLES)}, got {sorted(tables)}")
    inputs = _check(q, k, v, runtime_inputs)
    inputs.update(tables)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = _Attention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, inputs)
    return (o, lse) if return_lse else o
'''

__all__ = ["ModuleText", "module_name", "TARGETS", "TARGET_CONFIGS", "check_target", "check_head_dim", "check_dtype",
           "envelope_patterns", "module_plan", "generate_module"]
