"""Plan + Pattern -> Triton kernels, as source text (imports neither torch nor triton).

:func:`generate_kernels` emits, for one :class:`~attnlang.plan.Plan`:

* ``_attn_fwd`` — FlashAttention-2 online softmax, one program per (query tile, batch x head):
  the plan's full key tiles with no mask work, then its partial tiles with the pattern's
  predicate (:mod:`attnlang.codegen.predicate`); fp32 running max/sum in base 2 with
  ``scale * log2(e)`` folded into the scores; stores ``lse`` in natural log (fp32).
* ``_attn_bwd_preprocess`` — ``delta = rowsum(O * dO)``;
* ``_attn_bwd_dkdv`` — one program per (key tile, batch x kv head), looping the query heads of
  its GQA group and the query tiles of the transposed tables; no atomics;
* ``_attn_bwd_dq`` — one program per (query tile, batch x head), the forward's loops.

Tokens are addressed through pointer arithmetic only (no ``tl.make_block_ptr``, removed in
Triton 3.9): kernel position -> token index through the plan's order table when it permutes,
so Q/K/V/O stay in the user's order and no permutation pass is needed.

Head groups (``by head``) share one kernel: the program's head selects its group's loops with a
head-range switch. Analytic groups (``HeadGroup.analytic``) turn into loop bounds computed from
the query tile index for the forward and dQ passes; dK/dV always reads the transposed tables.

>>> from attnlang.pattern import Pattern, causal
>>> from attnlang.plan import Plan
>>> p = Pattern.create(causal, tokens=64)
>>> k = generate_kernels(Plan.from_mask(p, p.mask(), 16, 16))
>>> "def _attn_fwd(" in k.source and "tl.make_block_ptr" not in k.source
True
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np

from attnlang.codegen.predicate import ContentTable, Predicate, RuntimeInput, compile_predicate
from attnlang.errors import AttnError
from attnlang.plan import HeadGroup, Plan


class CodegenError(Exception):
    """Something the generator cannot express (caught internally; never reaches a user raw)."""


# --------------------------------------------------------------------------------------------
# sympy closed forms -> Triton integer expressions
# --------------------------------------------------------------------------------------------

def sympy_to_triton(expr, var: str = "qt") -> str:
    """Print a sympy integer expression in ``qt`` as Triton code.

    ``floor(a / b)`` becomes ``_floordiv(a, b)`` (Triton's ``//`` truncates toward zero),
    ``Min``/``Max`` become ``tl.minimum``/``tl.maximum``.

    >>> import sympy as sp
    >>> qt = sp.Symbol("qt")
    >>> sympy_to_triton(sp.Max(0, sp.floor((16 * qt - 40) / 16)))
    'tl.maximum(0, _floordiv((-5 + (2 * qt)), 2))'
    """
    import sympy as sp

    def p(e) -> str:
        if e.is_Integer:
            return str(int(e))
        if e.is_Symbol:
            if e.name != var:
                raise CodegenError(f"free symbol {e} in a tile range")
            return var
        if isinstance(e, sp.Add):
            return "(" + " + ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sp.Mul):
            if any(not (a.is_Integer or a.is_Symbol or not a.is_Number) for a in e.args):
                raise CodegenError(f"non-integer coefficient in {e}")
            return "(" + " * ".join(p(a) for a in e.args) + ")"
        if isinstance(e, (sp.floor, sp.ceiling)):
            num, den = sp.fraction(sp.together(e.args[0]))
            if not (den.is_Integer and den > 0):
                raise CodegenError(f"cannot divide by {den}")
            if isinstance(e, sp.floor):
                return f"_floordiv({p(sp.expand(num))}, {int(den)})"
            return f"-_floordiv({p(sp.expand(-num))}, {int(den)})"
        if isinstance(e, (sp.Min, sp.Max)):
            fn = "tl.minimum" if isinstance(e, sp.Min) else "tl.maximum"
            out = p(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {p(a)})"
            return out
        if isinstance(e, sp.Piecewise):
            out = None
            for val, cond in reversed(e.args):
                if cond is sp.true:
                    out = p(val)
                elif out is None:
                    raise CodegenError(f"Piecewise without a default branch: {e}")
                else:
                    out = f"tl.where({p(cond)}, {p(val)}, {out})"
            return out
        if isinstance(e, sp.core.relational.Relational):
            return f"({p(e.lhs)} {e.rel_op} {p(e.rhs)})"
        if isinstance(e, (sp.And, sp.Or)):
            op = " & " if isinstance(e, sp.And) else " | "
            return "(" + op.join(p(a) for a in e.args) + ")"
        if isinstance(e, sp.Mod) and e.args[1].is_Integer and e.args[1] > 0:
            a, m = e.args
            return f"({p(a)} - {int(m)} * _floordiv({p(a)}, {int(m)}))"
        raise CodegenError(f"cannot print {type(e).__name__} {e}")

    return p(sp.sympify(expr))


# --------------------------------------------------------------------------------------------
# the generated kernels
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """An int32/int8 array the kernels read, with the kernel argument name it is passed as."""

    name: str
    data: np.ndarray
    why: str


@dataclass
class Kernels:
    """Generated kernel source and what the launcher must pass to each kernel."""

    source: str
    tables: list[Table]  # static arrays (index tables, order, predicate tables)
    inputs: list[RuntimeInput]  # runtime inputs, in kernel argument order
    args: dict[str, list[str]]  # kernel name -> its table/input argument names, in order
    analytic: list[bool]  # per head group: loop bounds computed in-kernel
    notes: list[str] = field(default_factory=list)
    # per_call kernels: arrays passed on every call (tile tables, order, routing decisions)
    call_tables: list[str] = field(default_factory=list)
    content: list[ContentTable] = field(default_factory=list)
    groups: list[tuple[int, int | None, bool]] = field(default_factory=list)  # (lo, hi, per head)


_PREC = "input_precision=PRECISION"

_HELPERS = '''\
@triton.jit
def _floordiv(a, b):
    # floor(a / b) for a constant b > 0: Triton's integer // truncates toward zero instead.
    q = a // b
    return tl.where((a % b != 0) & (a < 0), q - 1, q)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _online_softmax(acc, l_i, m_i, s, v, PRECISION: tl.constexpr):
    # s is in base 2 (scale * log2(e) folded in). A row whose keys are all masked so far keeps
    # m = -inf; shifting it by 0 instead keeps exp2 away from (-inf) - (-inf) = nan.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new
'''


def _tok(plan: Plan, pos: str, full: bool = False) -> str:
    """Token index of kernel positions ``pos`` (``-1`` for padding and the ragged tail).

    ``full``: positions of a full tile, which the planner guarantees hold no padding.
    """
    if plan.order is None:
        return pos if full else f"tl.where({pos} < N_TOKENS, {pos}, -1)"
    return f"tl.load(ORDER + {pos}, mask={pos} < N_KERNEL, other=-1)"


def kernel_groups(plan: Plan, per_call: bool) -> list[tuple[int, int | None, bool]]:
    """``(lo, hi, per_head)`` of each head group the kernels switch on.

    Static and runtime-input plans: the plan's groups. Routed plans (one group per query head,
    from this call's selection) collapse into the pattern's branches, whose per-call tables
    then have one row per query head.
    """
    if per_call and plan.pattern.reads_content:
        return [(lo, hi, True) for lo, hi, _ in plan.pattern.exprs()]
    return [(g.lo, g.hi, False) for g in plan.groups]


class _Gen:
    def __init__(self, plan: Plan, per_call: bool = False):
        self.plan = plan
        self.per_call = per_call
        self.groups = kernel_groups(plan, per_call)
        self.tables: list[Table] = []
        self.call_tables: list[str] = []
        self.content: list[ContentTable] = []
        self.inputs: list[RuntimeInput] = []
        self.preds: list[Predicate] = []
        self.analytic: list[bool] = []
        self.bounds: list[tuple[str, str, str, str] | None] = []
        self.notes: list[str] = []
        if plan.order is not None:
            if per_call:
                self.call_tables.append("ORDER")
            else:
                self.tables.append(Table("ORDER", np.asarray(plan.order, dtype=np.int32),
                                         f"kernel position -> token index ({plan.n_kernel} positions, -1 = padding)"))
        for g, (lo, _, _) in enumerate(self.groups):
            expr = plan.pattern.expr_for_head(lo)
            pred = compile_predicate(expr, plan.pattern.layout, f"g{g}")
            self.preds.append(pred)
            for t in pred.tables:
                self.tables.append(Table(t.name, t.data, t.why))
            for inp in pred.inputs:
                if inp not in self.inputs:
                    self.inputs.append(inp)
            if pred.content and not per_call:
                raise AttnError(f"pattern '{plan.pattern.name}' reads Q/K content (route): its kernels take "
                                "the routing decisions per call", hint="generate them with per_call=True")
            self.content += pred.content
            self.call_tables += [c.name for c in pred.content]
            if per_call:  # tables of this call's plans, padded to full width (FlexAttention layout)
                self.call_tables += [f"G{g}_{tag}_{part}" for tag in ("FULL", "PART", "FULL_T", "PART_T")
                                     for part in ("NUM", "IDX")]
                self.bounds.append(None)
            else:
                self._group_tables(g, plan.groups[g])
                self.bounds.append(self._analytic(g, plan.groups[g]))
            self.analytic.append(self.bounds[-1] is not None)

    def _group_tables(self, g: int, group: HeadGroup) -> None:
        who = "all heads" if group.hi is None else f"heads {group.lo}..{group.hi}"
        for tag, tbl, what in (("FULL", group.full, "full key tiles per query tile"),
                               ("PART", group.partial, "partial key tiles per query tile"),
                               ("FULL_T", group.full_t, "query tiles per key tile with the tile full"),
                               ("PART_T", group.partial_t, "query tiles per key tile with the tile partial")):
            num, idx = tbl.padded()
            self.tables.append(Table(f"G{g}_{tag}_NUM", num.astype(np.int32), f"{who}: count of {what}"))
            self.tables.append(Table(f"G{g}_{tag}_IDX", idx.astype(np.int32).reshape(-1),
                                     f"{who}: {what} [{idx.shape[0]} x {idx.shape[1]}]"))

    def _analytic(self, g: int, group: HeadGroup):
        r = group.analytic
        if r is None:
            return None
        try:
            return tuple(sympy_to_triton(x) for x in (r.lo, r.hi, r.full_lo, r.full_hi))
        except CodegenError as e:
            self.notes.append(f"head group {g}: closed-form tile range not expressible ({e}); "
                              "reading the tables instead")
            return None

    def table_row(self, g: int) -> str:
        """Per-call tables: this program's row, ``[B, 1, ...]`` or per head ``[B, H, ...]``."""
        return "trow = b.to(tl.int64) * H + h\n" if self.groups[g][2] else "trow = b.to(tl.int64)\n"

    def width(self, name: str) -> int:
        if self.per_call:  # full width: table strides do not change from call to call
            return self.plan.q_tiles if "_T_" in name else self.plan.kv_tiles
        t = next(t for t in self.tables if t.name == name)
        num = next(x for x in self.tables if x.name == name.replace("_IDX", "_NUM"))
        return max(1, len(t.data) // max(1, len(num.data)))

    # -- argument lists ---------------------------------------------------------------------
    def pred_args(self, g: int) -> list[str]:
        return self.preds[g].args

    def kernel_args(self, kind: str) -> list[str]:
        names = ["ORDER"] if self.plan.order is not None else []
        for g in range(len(self.groups)):
            if kind == "dkdv":
                tags = ("FULL_T", "PART_T")
            elif self.analytic[g]:
                tags = ()
            else:
                tags = ("FULL", "PART")
            for tag in tags:
                names += [f"G{g}_{tag}_NUM", f"G{g}_{tag}_IDX"]
            for a in self.pred_args(g):
                if a not in names:
                    names.append(a)
        return names

    # -- loops over key tiles (forward and dQ) ----------------------------------------------
    def kv_loops(self, g: int, step: str) -> str:
        """Loops over the key tiles of query tile ``qt`` for group ``g``; ``step`` is a format
        string with ``{masked}`` (bool) that processes key tile ``kt``."""
        b = self.bounds[g]
        full_step = step.format(masked=False, g=g)
        part_step = step.format(masked=True, g=g)
        if b is None and self.per_call:
            qt_n, kv_n = self.plan.q_tiles, self.plan.kv_tiles
            return (
                self.table_row(g) +
                f"# full tiles: every (q, k) pair allowed, no mask work\n"
                f"for j in range(0, tl.load(G{g}_FULL_NUM + trow * {qt_n} + qt)):\n"
                f"    kt = tl.load(G{g}_FULL_IDX + (trow * {qt_n} + qt) * {kv_n} + j)\n"
                + textwrap.indent(full_step, "    ") +
                f"# partial tiles: the pattern's predicate per element\n"
                f"for j in range(0, tl.load(G{g}_PART_NUM + trow * {qt_n} + qt)):\n"
                f"    kt = tl.load(G{g}_PART_IDX + (trow * {qt_n} + qt) * {kv_n} + j)\n"
                + textwrap.indent(part_step, "    "))
        if b is None:
            wf, wp = self.width(f"G{g}_FULL_IDX"), self.width(f"G{g}_PART_IDX")
            return (
                f"# full tiles: every (q, k) pair allowed, no mask work\n"
                f"for j in range(0, tl.load(G{g}_FULL_NUM + qt)):\n"
                f"    kt = tl.load(G{g}_FULL_IDX + qt * {wf} + j)\n"
                + textwrap.indent(full_step, "    ") +
                f"# partial tiles: the pattern's predicate per element\n"
                f"for j in range(0, tl.load(G{g}_PART_NUM + qt)):\n"
                f"    kt = tl.load(G{g}_PART_IDX + qt * {wp} + j)\n"
                + textwrap.indent(part_step, "    "))
        lo, hi, flo, fhi = b
        return (
            f"# closed-form tile range (analytic plan): no index tables read\n"
            f"lo = tl.maximum({lo}, 0)\n"
            f"hi = tl.minimum({hi}, KV_TILES)\n"
            f"f_lo = tl.minimum(tl.maximum({flo}, lo), hi)\n"
            f"f_hi = tl.minimum(tl.maximum({fhi}, f_lo), hi)\n"
            f"for kt in range(f_lo, f_hi):  # full tiles\n"
            + textwrap.indent(full_step, "    ") +
            f"for kt in range(lo, f_lo):  # partial tiles before the full run\n"
            + textwrap.indent(part_step, "    ") +
            f"for kt in range(f_hi, hi):  # partial tiles after it\n"
            + textwrap.indent(part_step, "    "))

    def q_loops(self, g: int, step: str) -> str:
        """Loops over the query tiles of key tile ``kt`` (transposed tables) for group ``g``."""
        if self.per_call:
            qt_n, kv_n = self.plan.q_tiles, self.plan.kv_tiles
            return (
                self.table_row(g) +
                f"for j in range(0, tl.load(G{g}_FULL_T_NUM + trow * {kv_n} + kt)):\n"
                f"    qt = tl.load(G{g}_FULL_T_IDX + (trow * {kv_n} + kt) * {qt_n} + j)\n"
                + textwrap.indent(step.format(masked=False, g=g), "    ") +
                f"for j in range(0, tl.load(G{g}_PART_T_NUM + trow * {kv_n} + kt)):\n"
                f"    qt = tl.load(G{g}_PART_T_IDX + (trow * {kv_n} + kt) * {qt_n} + j)\n"
                + textwrap.indent(step.format(masked=True, g=g), "    "))
        wf, wp = self.width(f"G{g}_FULL_T_IDX"), self.width(f"G{g}_PART_T_IDX")
        return (
            f"for j in range(0, tl.load(G{g}_FULL_T_NUM + kt)):\n"
            f"    qt = tl.load(G{g}_FULL_T_IDX + kt * {wf} + j)\n"
            + textwrap.indent(step.format(masked=False, g=g), "    ") +
            f"for j in range(0, tl.load(G{g}_PART_T_NUM + kt)):\n"
            f"    qt = tl.load(G{g}_PART_T_IDX + kt * {wp} + j)\n"
            + textwrap.indent(step.format(masked=True, g=g), "    "))

    def head_switch(self, body_of_group, head: str = "h") -> str:
        """One group: its body. Several: ``if h < hi: ... elif ...`` over the head ranges."""
        groups = self.groups
        if len(groups) == 1:
            return body_of_group(0)
        out = []
        # `h < hi` tests are only right in ascending head order, whatever order the groups have.
        ordered = sorted(range(len(groups)), key=lambda g: groups[g][0])
        for i, g in enumerate(ordered):
            lo, hi, _ = groups[g]
            kw = "if" if i == 0 else "elif" if i < len(groups) - 1 else "else"
            cond = f" {head} < {hi}" if kw != "else" else ""
            out.append(f"{kw}{cond}:  # heads {lo}..{hi}\n" + textwrap.indent(body_of_group(g), "    "))
        return "".join(out)

    # -- kernels ----------------------------------------------------------------------------
    def pred_call(self, g: int, q: str, k: str) -> str:
        args = ", ".join([q, k, "b"] + self.preds[g].head_args + self.pred_args(g))
        return f"_allowed_g{g}({args})"

    def fwd(self) -> str:
        step = (
            "{k_tok}"
            "kT = tl.load(K + kv_base + k_tok[None, :] * HEAD_DIM + offs_d[:, None],\n"
            "             mask=d_ok[:, None]{kmask_T}, other=0.0)\n"
            "v = tl.load(V + v_base + k_tok[:, None] * V_DIM + offs_dv[None, :],\n"
            "            mask=dv_ok[None, :]{kmask}, other=0.0)\n"
            f"s = tl.dot(q, kT, {_PREC}) * qk_scale\n"
            "{apply_mask}"
            "acc, l_i, m_i = _online_softmax(acc, l_i, m_i, s, v, PRECISION)\n")
        body = lambda g: self.kv_loops(g, _StepTemplate(step, self, g, "fwd"))
        args = self.kernel_args("fwd")
        return (
            f"@triton.autotune(configs=_configs(), key=[\"HEAD_DIM\", \"V_DIM\"])\n"
            f"@triton.jit\n"
            f"def _attn_fwd(Q, K, V, O, LSE, {_sig(args)}qk_scale, H, GQA,\n"
            f"              N_TOKENS: tl.constexpr, N_KERNEL: tl.constexpr, KV_TILES: tl.constexpr,\n"
            f"              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,\n"
            f"              BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,\n"
            f"              PRECISION: tl.constexpr, EXACT: tl.constexpr):\n"
            + textwrap.indent(
                _PROLOGUE_Q.format(tok_q=_tok(self.plan, "offs_m")) +
                "q = tl.load(Q + q_base + q_tok[:, None] * HEAD_DIM + offs_d[None, :],\n"
                "            mask=q_ok[:, None] & d_ok[None, :], other=0.0)\n"
                "m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)\n"
                "l_i = tl.zeros([BLOCK_M], tl.float32)\n"
                "acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)\n"
                "poison = tl.zeros([BLOCK_M], tl.int32)  # EXACT: rows that see a non-finite value\n"
                + self.head_switch(body) +
                "# a row that saw no allowed key: zero output and lse = -inf (as FlexAttention)\n"
                "l_safe = tl.where(l_i > 0, l_i, 1.0)\n"
                "out = acc / l_safe[:, None]\n"
                "if EXACT:\n"
                "    out = tl.where(poison[:, None] > 0, float(\"nan\"), out)\n"
                "tl.store(O + o_base + q_tok[:, None] * V_DIM + offs_dv[None, :], out.to(O.dtype.element_ty),\n"
                "         mask=q_ok[:, None] & dv_ok[None, :])\n"
                "lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float(\"-inf\"))\n"
                "tl.store(LSE + row_base + q_tok, lse, mask=q_ok)\n", "    "))

    def dq(self) -> str:
        step = (
            "{k_tok}"
            "kT = tl.load(K + kv_base + k_tok[None, :] * HEAD_DIM + offs_d[:, None],\n"
            "             mask=d_ok[:, None]{kmask_T}, other=0.0)\n"
            "vT = tl.load(V + v_base + k_tok[None, :] * V_DIM + offs_dv[:, None],\n"
            "             mask=dv_ok[:, None]{kmask_T}, other=0.0)\n"
            f"s = tl.dot(q, kT, {_PREC}) * qk_scale\n"
            "p = tl.exp2(s - lse2[:, None])\n"
            "{apply_p_mask}"
            f"dp = tl.dot(do, vT, {_PREC})\n"
            "ds = p * (dp - delta[:, None])\n"
            "{exact_ds}"
            f"dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, {_PREC})\n")
        body = lambda g: self.kv_loops(g, _StepTemplate(step, self, g, "dq"))
        args = self.kernel_args("dq")
        return (
            f"@triton.autotune(configs=_configs(), key=[\"HEAD_DIM\", \"V_DIM\"])\n"
            f"@triton.jit\n"
            f"def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, {_sig(args)}qk_scale, sm_scale, H, GQA,\n"
            f"                 N_TOKENS: tl.constexpr, N_KERNEL: tl.constexpr, KV_TILES: tl.constexpr,\n"
            f"                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,\n"
            f"                 BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,\n"
            f"                 PRECISION: tl.constexpr, EXACT: tl.constexpr):\n"
            + textwrap.indent(
                _PROLOGUE_Q.format(tok_q=_tok(self.plan, "offs_m")) +
                "rows = q_base + q_tok[:, None] * HEAD_DIM + offs_d[None, :]\n"
                "q = tl.load(Q + rows, mask=q_ok[:, None] & d_ok[None, :], other=0.0)\n"
                "do = tl.load(DO + o_base + q_tok[:, None] * V_DIM + offs_dv[None, :],\n"
                "             mask=q_ok[:, None] & dv_ok[None, :], other=0.0)\n"
                "lse2 = tl.load(LSE + row_base + q_tok, mask=q_ok, other=0.0) * 1.4426950408889634\n"
                "delta = tl.load(DELTA + row_base + q_tok, mask=q_ok, other=0.0)\n"
                "dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)\n"
                + self.head_switch(body) +
                "tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])\n",
                "    "))

    def dkdv(self) -> str:
        step = (
            "{q_tok}"
            "rows = q_base + q_tok[:, None] * HEAD_DIM + offs_d[None, :]\n"
            "q = tl.load(Q + rows, mask=d_ok[None, :]{qmask}, other=0.0)\n"
            "do = tl.load(DO + o_base + q_tok[:, None] * V_DIM + offs_dv[None, :], mask=dv_ok[None, :]{qmask}, other=0.0)\n"
            "lse2 = tl.load(LSE + row_base + q_tok{qmask1}) * 1.4426950408889634\n"
            "delta = tl.load(DELTA + row_base + q_tok{qmask1})\n"
            "# transposed scores [BLOCK_N, BLOCK_M]: dK and dV need P^T and dS^T\n"
            f"sT = tl.dot(k, tl.trans(q), {_PREC}) * qk_scale\n"
            "pT = tl.exp2(sT - lse2[None, :])\n"
            "{apply_pT_mask}"
            f"dv = tl.dot(pT.to(do.dtype), do, dv, {_PREC})\n"
            f"dpT = tl.dot(v, tl.trans(do), {_PREC})\n"
            "dsT = pT * (dpT - delta[None, :])\n"
            "{exact_dsT}"
            f"dk = tl.dot(dsT.to(q.dtype), q, dk, {_PREC})\n")
        body = lambda g: self.q_loops(g, _StepTemplate(step, self, g, "dkdv"))
        args = self.kernel_args("dkdv")
        return (
            f"@triton.autotune(configs=_configs(), key=[\"HEAD_DIM\", \"V_DIM\"])\n"
            f"@triton.jit\n"
            f"def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, {_sig(args)}qk_scale, sm_scale, H, GQA,\n"
            f"                   N_TOKENS: tl.constexpr, N_KERNEL: tl.constexpr, KV_TILES: tl.constexpr,\n"
            f"                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,\n"
            f"                   BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,\n"
            f"                   PRECISION: tl.constexpr, EXACT: tl.constexpr):\n"
            + textwrap.indent(
                "kt = tl.program_id(0)\n"
                "bh = tl.program_id(1)\n"
                "HKV = H // GQA\n"
                "b = bh // HKV\n"
                "hk = bh % HKV\n"
                "kv_base = (b.to(tl.int64) * HKV + hk) * (N_TOKENS * HEAD_DIM)\n"
                "v_base = (b.to(tl.int64) * HKV + hk) * (N_TOKENS * V_DIM)\n"
                "offs_m = tl.arange(0, BLOCK_M)\n"
                "offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)\n"
                "offs_d = tl.arange(0, BLOCK_D)\n"
                "d_ok = offs_d < HEAD_DIM\n"
                "offs_dv = tl.arange(0, BLOCK_DV)\n"
                "dv_ok = offs_dv < V_DIM\n"
                f"k_tok = {_tok(self.plan, 'offs_n')}\n"
                "k_ok = k_tok >= 0\n"
                "kv_rows = kv_base + k_tok[:, None] * HEAD_DIM + offs_d[None, :]\n"
                "k = tl.load(K + kv_rows, mask=k_ok[:, None] & d_ok[None, :], other=0.0)\n"
                "v_rows = v_base + k_tok[:, None] * V_DIM + offs_dv[None, :]\n"
                "v = tl.load(V + v_rows, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)\n"
                "dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)\n"
                "dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)\n"
                "poison = tl.zeros([BLOCK_N], tl.int32)  # EXACT: keys seen by a non-finite row\n"
                "# every query head of this kv head's GQA group, in order: deterministic, no atomics\n"
                "for h in range(hk * GQA, hk * GQA + GQA):\n"
                "    q_base = (b.to(tl.int64) * H + h) * (N_TOKENS * HEAD_DIM)\n"
                "    row_base = (b.to(tl.int64) * H + h) * N_TOKENS\n"
                "    o_base = row_base * V_DIM\n"
                + textwrap.indent(self.head_switch(body), "    ") +
                "if EXACT:\n"
                "    dk = tl.where(poison[:, None] > 0, float(\"nan\"), dk)\n"
                "    dv = tl.where(poison[:, None] > 0, float(\"nan\"), dv)\n"
                "tl.store(DK + kv_rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])\n"
                "tl.store(DV + v_rows, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & dv_ok[None, :])\n",
                "    "))


class _StepTemplate(str):
    """A tile step whose mask slots are filled per (group, full/partial) by ``format``."""

    def __new__(cls, text: str, gen: _Gen, g: int, kind: str):
        obj = super().__new__(cls, text)
        obj.gen, obj.g, obj.kind = gen, g, kind
        return obj

    def format(self, masked: bool, g: int | None = None) -> str:  # type: ignore[override]
        g = self.g
        gen = self.gen
        slots = {"kmask_T": "", "kmask": "", "qmask": "", "qmask1": "",
                 "apply_mask": "", "apply_p_mask": "", "apply_pT_mask": "", "exact_ds": "", "exact_dsT": "",
                 "k_tok": f"k_tok = {_tok(gen.plan, 'kt * BLOCK_N + offs_n', full=True)}\n",
                 "q_tok": f"q_tok = {_tok(gen.plan, 'qt * BLOCK_M + offs_m', full=True)}\n"}
        if masked:
            slots["k_tok"] = (f"k_tok = {_tok(gen.plan, 'kt * BLOCK_N + offs_n')}\n"
                              "k_ok = k_tok >= 0\n")
            slots["q_tok"] = (f"q_tok = {_tok(gen.plan, 'qt * BLOCK_M + offs_m')}\n"
                              "q_ok = q_tok >= 0\n")
            slots["kmask_T"] = " & k_ok[None, :]"
            slots["kmask"] = " & k_ok[:, None]"
            slots["qmask"] = " & q_ok[:, None]"
            slots["qmask1"] = ", mask=q_ok, other=0.0"
            call = gen.pred_call(g, "q_tok[:, None]", "k_tok[None, :]")
            # EXACT (the launcher saw NaN/Inf in this call's inputs): values a row may not see
            # are zeroed before the products that would give it 0 * NaN, and rows (keys) that do
            # see one are marked, so their results come out NaN (docs/reliability.md).
            slots["apply_mask"] = (
                f"allowed = {call}\n"
                "s = tl.where(allowed, s, float(\"-inf\"))\n"
                "if EXACT:\n"
                "    v_bad = tl.max(tl.where(_finite(v), 0, 1), 1)\n"
                "    poison = tl.maximum(poison, tl.max(tl.where(allowed & (v_bad[None, :] > 0), 1, 0), 1))\n"
                "    v = tl.where(v_bad[:, None] > 0, 0.0, v)\n")
            # where() (not a product) so exp2 of a row with lse = -inf never leaks inf * 0
            slots["apply_p_mask"] = f"allowed = {call}\np = tl.where(allowed, p, 0.0)\n"
            slots["exact_ds"] = (
                "if EXACT:\n"
                "    ds = tl.where(allowed, ds, 0.0)\n"
                "    kT = tl.where(tl.max(tl.where(_finite(kT), 0, 1), 0)[None, :] > 0, 0.0, kT)\n")
            callT = gen.pred_call(g, "q_tok[None, :]", "k_tok[:, None]")
            slots["apply_pT_mask"] = (
                f"allowedT = {callT}\n"
                "pT = tl.where(allowedT, pT, 0.0)\n"
                "if EXACT:\n"
                "    q_bad = tl.maximum(tl.max(tl.where(_finite(q), 0, 1), 1), tl.max(tl.where(_finite(do), 0, 1), 1))\n"
                "    poison = tl.maximum(poison, tl.max(tl.where(allowedT & (q_bad[None, :] > 0), 1, 0), 1))\n"
                "    q = tl.where(q_bad[:, None] > 0, 0.0, q)\n"
                "    do = tl.where(q_bad[:, None] > 0, 0.0, do)\n")
            slots["exact_dsT"] = "if EXACT:\n    dsT = tl.where(allowedT, dsT, 0.0)\n"
        out = str(self)
        for key, val in slots.items():
            out = out.replace("{" + key + "}", val)
        return out


_PROLOGUE_Q = (
    "qt = tl.program_id(0)\n"
    "bh = tl.program_id(1)\n"
    "b = bh // H\n"
    "h = bh % H\n"
    "hk = h // GQA  # GQA: the kv head serving this query head\n"
    "q_base = (b.to(tl.int64) * H + h) * (N_TOKENS * HEAD_DIM)\n"
    "kv_base = (b.to(tl.int64) * (H // GQA) + hk) * (N_TOKENS * HEAD_DIM)\n"
    "row_base = (b.to(tl.int64) * H + h) * N_TOKENS\n"
    "# V, O and dO rows have the value head dim V_DIM (may differ from HEAD_DIM: MLA)\n"
    "v_base = (b.to(tl.int64) * (H // GQA) + hk) * (N_TOKENS * V_DIM)\n"
    "o_base = row_base * V_DIM\n"
    "offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)\n"
    "offs_n = tl.arange(0, BLOCK_N)\n"
    "offs_d = tl.arange(0, BLOCK_D)\n"
    "d_ok = offs_d < HEAD_DIM  # head dim padded to a power of two\n"
    "offs_dv = tl.arange(0, BLOCK_DV)\n"
    "dv_ok = offs_dv < V_DIM\n"
    "q_tok = {tok_q}\n"
    "q_ok = q_tok >= 0\n")

_PREPROCESS = '''\
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, N_ROWS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    # delta = rowsum(O * dO), in fp32: the softmax-gradient correction of every query row
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N_ROWS) & (offs_d[None, :] < HEAD_DIM)
    ptrs = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < N_ROWS)
'''


def _sig(args: list[str]) -> str:
    return "".join(a + ", " for a in args)


def generate_kernels(plan: Plan, per_call: bool = False) -> Kernels:
    """Generate every kernel of ``plan`` (forward, backward preprocess, dK/dV, dQ).

    ``per_call``: the tile tables (and the order) are not baked in but passed on every call with
    a batch dimension, as :func:`call_arrays` builds them from that call's per-batch-item plans:
    how runtime-input and routed patterns keep their exact full/partial tiles. ``plan`` then only
    fixes the tiling (block sizes, order or not, head groups), which must be the same for every
    call that reuses the kernels.
    """
    for name, b in (("block_m", plan.block_m), ("block_n", plan.block_n)):
        if b < 16 or b & (b - 1):
            raise AttnError(f"{name} = {b} cannot be a Triton tile",
                            hint="valid: a power of two >= 16 (tl.dot needs 16 x 16 operands)")
    gen = _Gen(plan, per_call)
    parts = [_HELPERS]
    parts += [p.source() for p in gen.preds]
    parts += [gen.fwd(), _PREPROCESS, gen.dkdv(), gen.dq()]
    args = {"_attn_fwd": gen.kernel_args("fwd"), "_attn_bwd_dq": gen.kernel_args("dq"),
            "_attn_bwd_dkdv": gen.kernel_args("dkdv")}
    return Kernels("\n\n".join(parts), gen.tables, gen.inputs, args, gen.analytic, gen.notes,
                   gen.call_tables, gen.content, gen.groups)


def _dense(table, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR table as FlexAttention-style ``(num [rows], idx [rows, width])``, zero padded."""
    counts = table.counts()
    idx = np.zeros((table.rows, width), dtype=np.int32)
    rows = np.repeat(np.arange(table.rows), counts)
    idx[rows, np.arange(table.nnz) - np.repeat(table.indptr[:-1], counts)] = table.indices
    return counts.astype(np.int32), idx


def call_arrays(kernels: Kernels, plans: list[Plan], contents: list[dict], heads: int) -> dict[str, np.ndarray]:
    """The per-call arrays of ``per_call`` kernels, from one plan (and routing content) per
    batch item: ``G<g>_<FULL|PART>_NUM [B, R, Q_TILES]``, ``..._IDX [B, R, Q_TILES, KV_TILES]``,
    the transposes ``[B, R, KV_TILES]`` / ``[B, R, KV_TILES, Q_TILES]`` (``R`` = 1, or ``heads``
    for routed groups), ``ORDER`` and each route's ``SEL``/``POS`` (see ``ContentTable``).

    Every plan must share the first one's tiling (block sizes, order, head groups).
    """
    first = plans[0]
    out: dict[str, np.ndarray] = {}
    if first.order is not None:
        out["ORDER"] = np.asarray(first.order, dtype=np.int32)
    for g, (lo, hi, per_head) in enumerate(kernels.groups):
        rows = heads if per_head else 1
        for tag, attr, width in (("FULL", "full", first.kv_tiles), ("PART", "partial", first.kv_tiles),
                                 ("FULL_T", "full_t", first.q_tiles), ("PART_T", "partial_t", first.q_tiles)):
            n_rows = first.kv_tiles if tag.endswith("_T") else first.q_tiles
            num = np.zeros((len(plans), rows, n_rows), dtype=np.int32)
            idx = np.zeros((len(plans), rows, n_rows, width), dtype=np.int32)
            for b, plan in enumerate(plans):
                for r in range(rows):  # per head: the row is the query head itself
                    head = r if per_head else lo
                    if not (lo <= head < (heads if hi is None else hi)):
                        continue  # a head of another branch: never read
                    grp = next(x for x in plan.groups if x.lo <= head and (x.hi is None or head < x.hi))
                    num[b, r], idx[b, r] = _dense(getattr(grp, attr), width)
            out[f"G{g}_{tag}_NUM"], out[f"G{g}_{tag}_IDX"] = num, idx
    for c in kernels.content:
        key, dtype = (c.route, np.int8) if c.kind == "sel" else ((c.route, "pos"), np.int32)
        # C order whatever the routing stage's layout (a scope = head selection is a transposed view)
        out[c.name] = np.ascontiguousarray(np.stack([np.asarray(ct[key], dtype=dtype) for ct in contents]))
    return out


__all__ = ["CodegenError", "Kernels", "Table", "call_arrays", "generate_kernels", "kernel_groups", "sympy_to_triton"]
