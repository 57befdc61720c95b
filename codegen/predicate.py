"""Pattern IR -> Triton ``tl`` expressions: the mask of a partial tile, as source text.

One pass, :func:`compile_predicate`, turns a bound expression into the body of a
``@triton.jit`` function ``allowed(q, k, b, <aux pointers>)`` over a ``[BLOCK_M, 1]`` column of
query token indices and a ``[1, BLOCK_N]`` row of key token indices (``-1`` = padding, never
allowed). Per-axis coordinates are recovered with ``//`` and ``%`` by the layout's constant
strides, only for the axes the expression reads.

Triton's integer ``//`` and ``%`` truncate toward zero (C semantics), unlike Python's; every
formula below only divides non-negative numbers (shifts are folded into ``[0, size)`` first), so
the two agree on every valid token.

>>> from attnlang.pattern import Pattern, block, causal
>>> p = Pattern.create(causal & block((2, 4)), tokens=(4, 8))
>>> pred = compile_predicate(p.attend, p.layout, "g0")
>>> pred.lines
['qh = (q // 8)  # axis h[4]', 'qw = q % 8  # axis w[8]', 'kh = (k // 8)  # axis h[4]', 'kw = k % 8  # axis w[8]']
>>> pred.expr
'((k <= q) & ((qh // 2 == kh // 2) & (qw // 4 == kw // 4)))'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from attnlang.pattern import (
    INF, And, Axial, Block, Causal, Empty, Expr, Full, Grid, Halo, Keys, Layout,
    Neighborhood, Not, Or, Queries, Random, Range, Route, Same, Strided, Valid, Window,
)

# Index lists up to this length are compiled to a chain of comparisons; longer ones to a
# per-token membership table (one load instead of a long chain of compares).
INLINE_LIST_MAX = 8


@dataclass(frozen=True)
class AuxTable:
    """A static int8 table the predicate reads (random blocks, long index lists)."""

    name: str  # kernel argument name, e.g. G0_RAND0
    data: np.ndarray  # int8, flat
    why: str  # one line for the generated header


@dataclass(frozen=True)
class RuntimeInput:
    """A runtime input the predicate reads: ``ids`` [B, N] or ``length`` [B]."""

    name: str  # input name in the pattern
    kind: str  # "ids" | "length"

    @property
    def arg(self) -> str:
        return f"IN_{self.name}"


@dataclass(frozen=True)
class ContentTable:
    """A per-call table a ``route`` reads, filled from one call's routing decisions.

    ``sel``: int8 ``[B, H, groups, blocks]``, 1 where the key block is selected for the query
    group; ``pos``: int32 ``[B, H, N]``, key -> its position in the permuted order
    (``permute_keys``).
    """

    name: str  # kernel argument name, e.g. G0_SEL0
    route: Route  # the bound node whose ``Env.content`` entries fill it
    kind: str  # "sel" | "pos"


@dataclass
class Predicate:
    """Compiled mask of one head group: statements, the final expression, what it reads."""

    fn_name: str
    lines: list[str] = field(default_factory=list)  # statements before the result
    expr: str = ""
    tables: list[AuxTable] = field(default_factory=list)
    inputs: list[RuntimeInput] = field(default_factory=list)
    content: list[ContentTable] = field(default_factory=list)

    @property
    def uses_head(self) -> bool:
        """Content tables are per query head: the function then takes ``h`` and ``H`` too."""
        return bool(self.content)

    @property
    def args(self) -> list[str]:
        return [t.name for t in self.tables] + [i.arg for i in self.inputs] + [c.name for c in self.content]

    @property
    def head_args(self) -> list[str]:
        return ["h", "H"] if self.uses_head else []

    def source(self) -> str:
        """The ``@triton.jit`` function text."""
        params = ", ".join(["q", "k", "b"] + self.head_args + self.args)
        body = "\n".join("    " + ln for ln in self.lines)
        return (f"@triton.jit\ndef {self.fn_name}({params}):\n"
                f"    # q: [BLOCK_M, 1] and k: [1, BLOCK_N] token indices, -1 = padding\n"
                + (body + "\n" if body else "")
                + f"    return (q >= 0) & (k >= 0) & {self.expr}\n")


class _Compiler:
    def __init__(self, layout: Layout, prefix: str, n_tokens: int):
        self.layout = layout
        self.prefix = prefix.upper()
        self.n = n_tokens
        self.out = Predicate(f"_allowed_{prefix}")
        self.coords: set[tuple[str, int]] = set()
        self.tmp = 0

    # -- coordinates ------------------------------------------------------------------------
    def coord(self, side: str, a: int) -> str:
        """Name of the per-axis coordinate of ``q``/``k`` on axis ``a`` (computed on demand)."""
        self.coords.add((side, a))
        return f"{side}{self.layout.names[a]}"

    def coord_lines(self) -> list[str]:
        sizes = self.layout.sizes
        lines = []
        for side in ("q", "k"):
            for a in range(len(sizes)):
                if (side, a) not in self.coords:
                    continue
                stride = math.prod(sizes[a + 1:])
                v = side if stride == 1 else f"({side} // {stride})"
                if a > 0:
                    v = f"{v} % {sizes[a]}"
                lines.append(f"{side}{self.layout.names[a]} = {v}  # axis {self.layout.names[a]}[{sizes[a]}]")
        return lines

    def fresh(self, stem: str) -> str:
        self.tmp += 1
        return f"{stem}{self.tmp}"

    # -- nodes ------------------------------------------------------------------------------
    def expr(self, e: Expr) -> str:
        rule = TRITON.get(type(e))
        if rule is None:  # tests/ir/test_tables.py keeps TRITON complete: only a new, unlisted node
            raise NotImplementedError(
                f"the triton backend cannot compile '{e.to_attn()}' ({type(e).__name__}): add it to "
                "attnlang.codegen.predicate.TRITON, or use backend='torch' or backend='reference'")
        return rule(self, e)

    def _full(self, e: Full) -> str:
        return "(k >= -1)"

    def _empty(self, e: Empty) -> str:
        return "(k < -1)"

    def _causal(self, e: Causal) -> str:
        if e.axis is None:
            return "(k <= q)"
        a = self.layout.index(e.axis)
        return f"({self.coord('k', a)} <= {self.coord('q', a)})"

    def _window(self, e: Window) -> str:
        parts = []
        if e.before != INF:
            parts.append(f"((k - q) >= -{int(e.before)})")
        if e.after != INF:
            parts.append(f"((k - q) <= {int(e.after)})")
        return _join(parts, "&") if parts else "(k >= -1)"

    def _selection(self, side: str, sel, what: str) -> str:
        if isinstance(sel, Range):
            return f"(({side} >= {sel.lo}) & ({side} < {sel.hi}))"
        vals = sel.values
        if not vals:
            return f"({side} < -1)"
        if len(vals) <= INLINE_LIST_MAX:
            return _join([f"({side} == {v})" for v in vals], "|")
        member = np.zeros(self.n, dtype=np.int8)
        member[list(vals)] = 1
        name = f"{self.prefix}_{what.upper()}{len(self.out.tables)}"
        self.out.tables.append(AuxTable(name, member, f"membership of the {len(vals)} listed {what}"))
        return f"(tl.load({name} + {side}, mask={side} >= 0, other=0) != 0)"

    def _keys(self, e: Keys) -> str:
        return self._selection("k", e.sel, "keys")

    def _queries(self, e: Queries) -> str:
        return self._selection("q", e.sel, "queries")

    def _random(self, e: Random) -> str:
        table = e.table(self.layout).astype(np.int8)
        nb = table.shape[0]
        name = f"{self.prefix}_RAND{len(self.out.tables)}"
        self.out.tables.append(AuxTable(
            name, table.reshape(-1),
            f"random(block = {e.block}, count = {e.count}, seed = {e.seed}): [{nb} x {nb}] drawn key blocks"))
        return (f"(tl.load({name} + (q // {e.block}) * {nb} + k // {e.block}, "
                f"mask=(q >= 0) & (k >= 0), other=0) != 0)")

    def _neighborhood(self, e: Neighborhood) -> str:
        parts = []
        for a, L in enumerate(self.layout.sizes):
            K, d, s, c = e.window[a], e.dilation[a], e.stride[a], e.causal[a]
            qa, ka = self.coord("q", a), self.coord("k", a)
            ax = self.layout.names[a]
            t = self.fresh(f"na_{ax}")
            lines = self.out.lines
            lines.append(f"# neighborhood on axis {ax}: window {K}, dilation {d}, stride {s}"
                         f"{', causal' if c else ''} (NATTEN/GNA, docs/language.md §4.1)")
            qi = qa if d == 1 else f"({qa} // {d})"
            ki = ka if d == 1 else f"({ka} // {d})"
            if d == 1:
                lg = str(L)
            else:
                lines.append(f"{t}_lg = ({L} - {qa} % {d} + {d - 1}) // {d}  # length of the dilation group")
                lg = f"{t}_lg"
            lead_in = qi if s == 1 else f"({qi} // {s}) * {s}"
            off = s - 1 if c else s // 2
            lead_in = lead_in if off == 0 else f"{lead_in} + {off}"
            last = str(L - 1) if d == 1 else f"{lg} - 1"
            lines.append(f"{t}_lead = tl.minimum({lead_in}, {last})")
            if c:
                lines.append(f"{t}_start = tl.maximum({t}_lead - {K - 1}, 0)")
                lines.append(f"{t}_end = tl.minimum({qi} + 1, {lg})")
            else:
                top = str(L - K) if d == 1 else f"{lg} - {K}"
                lines.append(f"{t}_start = tl.minimum(tl.maximum({t}_lead - {K // 2}, 0), {top})")
                lines.append(f"{t}_end = {t}_start + {K}")
            cond = f"({ki} >= {t}_start) & ({ki} < {t}_end)"
            if d > 1:
                cond = f"({ka} % {d} == {qa} % {d}) & {cond}"
            parts.append(f"({cond})")
        return _join(parts, "&")

    def _block(self, e: Block) -> str:
        parts = []
        for a in range(self.layout.rank):
            S, o = e.size[a], e.shift[a] % e.size[a]
            qa, ka = self.coord("q", a), self.coord("k", a)
            if o == 0:
                parts.append(f"({qa} // {S} == {ka} // {S})")
            else:
                # floor((x - o) / S) compared on both sides: add S - o so numerators stay >= 0.
                parts.append(f"(({qa} + {S - o}) // {S} == ({ka} + {S - o}) // {S})")
        return _join(parts, "&")

    def _strided_steps(self, steps) -> str:
        parts = []
        for a, s in enumerate(steps):
            if s == 1:
                continue
            parts.append(f"({self.coord('q', a)} % {s} == {self.coord('k', a)} % {s})")
        return _join(parts, "&") if parts else "(k >= -1)"

    def _strided(self, e: Strided) -> str:
        return self._strided_steps(e.step)

    def _grid(self, e: Grid) -> str:
        return self._strided_steps(e.steps(self.layout))

    def _axial(self, e: Axial) -> str:
        ax = self.layout.index(e.axis)
        parts = [f"({self.coord('q', a)} == {self.coord('k', a)})" for a in range(self.layout.rank) if a != ax]
        return _join(parts, "&") if parts else "(k >= -1)"

    def _halo(self, e: Halo) -> str:
        parts = []
        for a in range(self.layout.rank):
            B, h = e.block[a], e.halo[a]
            qa, ka = self.coord("q", a), self.coord("k", a)
            t = self.fresh(f"halo_{self.layout.names[a]}")
            self.out.lines.append(f"{t} = ({qa} // {B}) * {B} - {h}  # first key of the halo window")
            parts.append(f"(({ka} >= {t}) & ({ka} < {t} + {B + 2 * h}))")
        return _join(parts, "&")

    def _input(self, name: str, kind: str) -> str:
        inp = RuntimeInput(name, kind)
        if inp not in self.out.inputs:
            self.out.inputs.append(inp)
        return inp.arg

    def _same(self, e: Same) -> str:
        ptr = self._input(e.input, "ids")
        t = self.fresh(f"ids_{e.input}_")
        self.out.lines.append(f"{t}q = tl.load({ptr} + b * {self.n} + q, mask=q >= 0, other=-1)")
        self.out.lines.append(f"{t}k = tl.load({ptr} + b * {self.n} + k, mask=k >= 0, other=-2)")
        return f"({t}q == {t}k)"

    def _valid(self, e: Valid) -> str:
        ptr = self._input(e.input, "length")
        t = self.fresh(f"len_{e.input}_")
        self.out.lines.append(f"{t} = tl.load({ptr} + b)  # this batch item's valid length")
        return f"((q < {t}) & (k < {t}))"

    def _box(self, side: str, box: tuple[int, ...]) -> str:
        """Row-major number of the ``box``-shaped cell holding token ``side`` (ragged end boxes),
        as :func:`attnlang.pattern.box_ids`."""
        sizes = self.layout.sizes
        if len(sizes) == 1:
            return side if box[0] == 1 else f"({side} // {box[0]})"
        out = ""
        for a, (L, bx) in enumerate(zip(sizes, box)):
            c = self.coord(side, a)
            here = c if bx == 1 else f"({c} // {bx})"
            out = here if not out else f"({out} * {-(-L // bx)} + {here})"
        return out

    def _route(self, e: Route) -> str:
        # The selection was made for this call by the routing stage; the kernel only reads it:
        # the query's group and the key's block (its permuted position's run with permute_keys).
        i = len(self.out.content)
        sel = ContentTable(f"{self.prefix}_SEL{i}", e, "sel")
        self.out.content.append(sel)
        G, nb = e.groups(self.layout), e.blocks(self.layout)
        if e.permute is None:
            blk = self._box("k", e.block)
        else:
            pos = ContentTable(f"{self.prefix}_POS{i}", e, "pos")
            self.out.content.append(pos)
            t = self.fresh("route_pos")
            self.out.lines.append(f"{t} = tl.load({pos.name} + (b * H + h).to(tl.int64) * {self.n} + k, "
                                  "mask=k >= 0, other=0)  # key -> permuted position")
            blk = f"({t} // {e.block[0]})"
        grp = self._box("q", e.query_block)
        return (f"(tl.load({sel.name} + ((b * H + h).to(tl.int64) * {G} + {grp}) * {nb} + {blk}, "
                f"mask=(q >= 0) & (k >= 0), other=0) != 0)")

    def _and(self, e: And) -> str:
        return _join([self.expr(it) for it in e.items], "&")

    def _or(self, e: Or) -> str:
        return _join([self.expr(it) for it in e.items], "|")

    def _not(self, e: Not) -> str:
        return f"~{self.expr(e.item)}"


# The Triton predicate table: node type -> the _Compiler method that writes its ``tl`` expression.
TRITON: dict[type, Callable[[_Compiler, Any], str]] = {
    Full: _Compiler._full,
    Empty: _Compiler._empty,
    Causal: _Compiler._causal,
    Window: _Compiler._window,
    Keys: _Compiler._keys,
    Queries: _Compiler._queries,
    Random: _Compiler._random,
    Neighborhood: _Compiler._neighborhood,
    Block: _Compiler._block,
    Strided: _Compiler._strided,
    Grid: _Compiler._grid,
    Axial: _Compiler._axial,
    Halo: _Compiler._halo,
    Same: _Compiler._same,
    Valid: _Compiler._valid,
    Route: _Compiler._route,
    And: _Compiler._and,
    Or: _Compiler._or,
    Not: _Compiler._not,
}
TRITON_LEAVES_OUT: dict[type, str] = {}  # every node compiles


def _join(parts: list[str], op: str) -> str:
    return parts[0] if len(parts) == 1 else "(" + f" {op} ".join(parts) + ")"


def compile_predicate(expr: Expr, layout: Layout, prefix: str) -> Predicate:
    """Compile one bound expression to a ``@triton.jit`` mask function named ``_allowed_<prefix>``."""
    c = _Compiler(layout, prefix, layout.n)
    result = c.expr(expr)
    c.out.lines = c.coord_lines() + c.out.lines
    c.out.expr = result
    return c.out


__all__ = ["TRITON", "TRITON_LEAVES_OUT", "AuxTable", "ContentTable", "RuntimeInput", "Predicate", "compile_predicate", "INLINE_LIST_MAX"]
