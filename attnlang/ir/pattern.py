"""The bound pattern: heads (``by head``), runtime inputs, schedule, ``pyramid``, and
:meth:`Pattern.create`, the one boundary where expressions are bound to a layout and validated."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np

from attnlang.errors import AttnError, Diagnostic, Span, did_you_mean
from attnlang.ir.bind import _check, _fmt_axis, _len, _per_axis, _prim_name, check_boxes
from attnlang.ir.expr import Expr, Full, PerAxis, _span
from attnlang.ir.layout import Env, Layout
from attnlang.ir.primitives import Same, Valid
from attnlang.ir.route import Route


@dataclass(frozen=True)
class HeadRange:
    """One branch of ``by head``: heads ``lo..hi`` use ``expr``."""

    lo: int
    hi: int
    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class ByHead:
    """Different patterns for different query-head ranges; ranges cover ``0..heads`` once."""

    branches: tuple[HeadRange, ...]
    span: Span | None = _span()

    def to_attn(self, indent: str = "    ") -> str:
        lines = ["by head {"]
        for b in self.branches:
            lines.append(f"{indent}    {b.lo}..{b.hi}: {b.expr.to_attn()}")
        lines.append(indent + "}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Pyramid:
    """PSA pooled pyramid (docs/language.md §13.2): a whole ``attend``, not an Expr (it says at what
    resolution keys are seen, not only which). Semantics and validation: :mod:`attnlang.pyramid`."""

    keyword = "pyramid"  # the name in the language

    block: PerAxis
    keep: tuple[float, ...] | None = None  # fraction of eligible blocks per level; required
    query_block: PerAxis = 1
    levels: tuple[int, ...] = (1, 2, 4, 8)
    among: Expr = Full()
    span: Span | None = _span()

    def bind(self, layout: Layout, out: list[Diagnostic]) -> "Pyramid":
        return bind_pyramid(self, layout, out)

    def to_attn(self, indent: str = "") -> str:
        args = [f"block = {_fmt_axis(self.block)}"]
        if self.query_block not in (1, (1,) * _len(self.query_block)):
            args.append(f"query_block = {_fmt_axis(self.query_block)}")
        args.append("levels = [" + ", ".join(map(str, self.levels)) + "]")
        args.append("keep = [" + ", ".join(map(repr, self.keep or ())) + "]")
        if not isinstance(self.among, Full):
            args.append(f"among = {self.among.to_attn()}")
        return f"pyramid({', '.join(args)})"

    def __str__(self) -> str:
        return self.to_attn()


# Pyramid validation lives with the node, as Route's does (was attnlang.pyramid.bind_pyramid;
# moved so that the IR imports nothing above it).

def bind_pyramid(p: Pyramid, layout: Layout, out: list[Diagnostic]) -> Pyramid:
    """Normalise per-axis sizes and check every constraint of docs/language.md §13.2, appending to ``out``."""
    n0 = len(out)
    block = _per_axis(p, "block", p.block, layout, out)
    qblock = _per_axis(p, "query_block", p.query_block, layout, out)
    if len(out) == n0:
        check_boxes(p, "pyramid", {"block": block, "query_block": qblock}, layout, out)
    levels, keep = tuple(p.levels), tuple(p.keep or ())
    if not keep:
        out.append(Diagnostic("pyramid needs keep = [...]: the fraction of eligible blocks each level gets",
                              p.span, f"e.g. keep = [{', '.join(['0.1'] * max(1, len(levels)))}]"))
    bad_levels = [v for v in levels if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1)]
    if not levels or bad_levels:
        out.append(Diagnostic(f"pyramid levels {list(levels)} must be a non-empty list of positive integers",
                              p.span, "e.g. levels = [1, 2, 4, 8] (tokens pooled per key at each level)"))
    bad_keep = [v for v in keep if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)]
    if bad_keep:
        out.append(Diagnostic(f"pyramid keep {list(keep)} has entries outside 0..1: {bad_keep}", p.span,
                              "each keep entry is a fraction of the eligible blocks, 0 <= f <= 1"))
    if keep and levels and len(keep) != len(levels):
        out.append(Diagnostic(f"pyramid has {len(levels)} levels {list(levels)} but {len(keep)} keep "
                              f"fractions {list(keep)}", p.span, "give one keep fraction per level"))
    if keep and not bad_keep and sum(map(exact_fraction, keep)) > 1:
        total = sum(Decimal(repr(float(x))) for x in keep)
        out.append(Diagnostic(f"pyramid keep {list(keep)} sums to {total}, more than 1", p.span,
                              "valid: sum(keep) <= 1 as the decimals are written (the rest of the "
                              "blocks are skipped)"))
    if len(out) == n0:
        sizes = block_sizes(layout, block)
        for lv in levels:
            bad = [s for s in sizes if s % lv]
            _check(not bad, out, p,
                   f"pyramid level {lv} does not divide the block token count {bad[0] if bad else ''}"
                   f" (blocks {_fmt_box(block)} on tokens {layout.to_attn()} hold {sorted(sizes)} tokens)",
                   "every level must divide the token count of every block, including the smaller "
                   "boxes at the end of an axis; pick a block shape that divides the axes")
    among = p.among
    if not isinstance(among, Expr):
        out.append(Diagnostic(f"pyramid among must be a pattern expression, got {among!r}", p.span))
    else:
        among = among.bind(layout, out)
    return Pyramid(block, tuple(float(x) for x in keep) if not bad_keep else keep, qblock,
                   tuple(int(x) for x in levels) if not bad_levels else levels, among, p.span)


def _fmt_box(box: tuple[int, ...]) -> str:
    return str(box[0]) if len(box) == 1 else "(" + ", ".join(map(str, box)) + ")"


def exact_fraction(x: float) -> Fraction:
    """A keep fraction as the decimal the user wrote (0.1 is 1/10, not the nearest double)."""
    return Fraction(repr(float(x)))


def block_sizes(layout: Layout, box: tuple[int, ...]) -> set[int]:
    """The distinct token counts of the boxes that tile the layout (full boxes and axis tails)."""
    per_axis = [{b} | ({L % b} if L % b else set()) for L, b in zip(layout.sizes, box)]
    return {math.prod(c) for c in itertools.product(*per_axis)}




def _no_mask(pattern: "Pattern") -> AttnError:
    return AttnError(
        f"pattern '{pattern.name}' is a pyramid(...): it reads Q/K and pools keys, so it has no "
        "boolean mask or static tile plan",
        hint="run it through attnlang.compile(...)(q, k, v) (torch or reference backend); "
             "attnlang.pyramid.level_table gives the levels it picks")


@dataclass(frozen=True)
class Input:
    """A runtime input: ``input doc: ids[N]`` (int ids per token) or ``input len: length``."""

    name: str
    kind: str  # "ids" | "length"
    span: Span | None = _span()

    def to_attn(self, n: int) -> str:
        return f"input {self.name}: ids[{n}]" if self.kind == "ids" else f"input {self.name}: length"


ORDERS = ("natural", "tiled", "morton", "hilbert", "rcm")


@dataclass(frozen=True)
class Schedule:
    """How to run (never what): tile boxes and the token order; ``None`` = planner's choice."""

    tile_q: tuple[int, ...] | None = None
    tile_kv: tuple[int, ...] | None = None
    order: str | None = None
    span: Span | None = _span()

    def to_attn(self) -> list[str]:
        lines = []
        if self.tile_q is not None or self.tile_kv is not None:
            args = []
            if self.tile_q is not None:
                args.append(f"q = {_fmt_tile(self.tile_q)}")
            if self.tile_kv is not None:
                args.append(f"kv = {_fmt_tile(self.tile_kv)}")
            lines.append(f"schedule tile({', '.join(args)})")
        if self.order is not None:
            lines.append(f"schedule order({self.order})")
        return lines


def _fmt_tile(t: tuple[int, ...]) -> str:
    return str(t[0]) if len(t) == 1 else "(" + ", ".join(map(str, t)) + ")"


@dataclass(frozen=True)
class Pattern:
    """A bound attention pattern: layout, expression(s), heads, runtime inputs and schedule.

    Build one from Python with :meth:`create` (which validates), or get one from a ``.attn``
    file through :func:`attnlang.parse` / :func:`attnlang.compile`.

    >>> from attnlang import neighborhood, causal
    >>> p = Pattern.create(neighborhood(window=(3, 7, 7)) & causal("t"), tokens=(4, 16, 16))
    >>> p.n
    1024
    """

    layout: Layout
    attend: Expr | ByHead | Pyramid
    name: str = "pattern"
    heads: int | None = None
    inputs: tuple[Input, ...] = ()
    schedule: Schedule = Schedule()
    params: tuple[tuple[str, Any], ...] = ()  # resolved parameter values, for printing/caching
    span: Span | None = _span()

    # -- boundary -------------------------------------------------------------------------
    @staticmethod
    def create(attend: Expr | ByHead | Mapping[tuple[int, int], Expr], tokens: Any, *,
               name: str = "pattern", heads: int | None = None,
               inputs: Mapping[str, str] | Sequence[Input] = (),
               tile_q: Any = None, tile_kv: Any = None, order: str | None = None,
               params: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
               span: Span | None = None) -> "Pattern":
        """Bind ``attend`` to a layout and validate everything; raise :class:`AttnError` listing
        every problem. ``attend`` may be a dict ``{(0, 6): expr, (6, 8): expr}`` for per-head
        patterns, ``inputs`` a dict ``{"doc": "ids", "len": "length"}``.
        """
        out: list[Diagnostic] = []
        layout = Layout.of(tokens)
        if isinstance(inputs, Mapping):
            inputs = tuple(Input(n, kind) for n, kind in inputs.items())
        inputs = tuple(inputs)
        for inp in inputs:
            if inp.kind not in ("ids", "length"):
                out.append(Diagnostic(f"input '{inp.name}' has kind '{inp.kind}'", inp.span,
                                      "valid kinds: ids, length"))
        if isinstance(attend, Mapping):
            attend = ByHead(tuple(HeadRange(lo, hi, e) for (lo, hi), e in attend.items()))
        if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
            out.append(Diagnostic(f"heads {heads!r} must be a positive integer"))
            heads = None
        if isinstance(attend, ByHead):
            attend, heads = _bind_by_head(attend, heads, layout, out)
        elif isinstance(attend, (Expr, Pyramid)):
            attend = attend.bind(layout, out)
        else:
            raise AttnError(f"attend must be a pattern expression, got {type(attend).__name__}")
        exprs = [b.expr for b in attend.branches] if isinstance(attend, ByHead) else [attend]
        exprs = [attend.among] if isinstance(attend, Pyramid) else exprs
        declared = {i.name: i for i in inputs}
        for e in exprs:
            for node in e.walk():
                if isinstance(node, (Same, Valid)):
                    want = "ids" if isinstance(node, Same) else "length"
                    inp = declared.get(node.input)
                    fn = _prim_name(node)
                    if inp is None:
                        out.append(Diagnostic(
                            f"{fn}({node.input}): no input named '{node.input}' is declared"
                            f"{did_you_mean(node.input, declared)}", node.span,
                            f"declare it: input {node.input}: " + ("ids[N]" if want == "ids" else "length")
                            if node.span is not None else  # built in Python: no `input` lines there
                            f"pass inputs={{'{node.input}': '{want}'}} to Pattern.create"))
                    elif inp.kind != want:
                        out.append(Diagnostic(
                            f"{fn}({node.input}) needs an input of kind {want}, but '{node.input}' "
                            f"is declared as {inp.kind}", node.span))
        schedule = Schedule(_tile(tile_q, layout, "q", out, span), _tile(tile_kv, layout, "kv", out, span),
                            order, span)
        if order is not None and order not in ORDERS:
            out.append(Diagnostic(f"unknown order '{order}'{did_you_mean(str(order), ORDERS)}", span,
                                  f"valid orders: {', '.join(ORDERS)}"))
        if out:
            raise AttnError(out)
        params = tuple(params.items()) if isinstance(params, Mapping) else tuple(params)
        return Pattern(layout, attend, name, heads, inputs, schedule, params, span)

    # -- queries --------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.layout.n

    def exprs(self) -> tuple[tuple[int, int | None, Expr], ...]:
        """``(head_lo, head_hi, expr)`` per distinct branch; ``hi=None`` means all heads."""
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        if isinstance(self.attend, ByHead):
            return tuple((b.lo, b.hi, b.expr) for b in self.attend.branches)
        return ((0, self.heads, self.attend),)

    def expr_for_head(self, head: int) -> Expr:
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        if isinstance(self.attend, ByHead):
            for b in self.attend.branches:
                if b.lo <= head < b.hi:
                    return b.expr
            raise AttnError(f"head {head} is outside 0..{self.heads}")
        return self.attend

    @property
    def reads_content(self) -> bool:
        """Whether the pattern reads Q/K themselves (docs/language.md §13): planned per call."""
        if isinstance(self.attend, Pyramid):
            return True
        return any(isinstance(n, Route) for _, _, e in self.exprs() for n in e.walk())

    def mask(self, heads: int | None = None, inputs: Mapping[str, Any] | None = None,
             content: Mapping[Any, np.ndarray] | None = None) -> np.ndarray:
        """Dense boolean mask ``[heads, N, N]`` (``heads`` defaults to the pattern's, else 1).

        ``inputs`` are one batch item's runtime inputs (numpy-convertible); ``content`` is one
        batch item's routing decisions (:func:`attnlang.routing.route_content`) for patterns
        with ``route``. This is the literal semantics, O(N²): use it on small sizes only.
        """
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        h = heads if heads is not None else (self.heads or 1)
        env_inputs = {k: np.asarray(v) for k, v in (inputs or {}).items()}
        missing = [i.name for i in self.inputs if i.name not in env_inputs]
        if missing:
            raise AttnError(f"pattern '{self.name}' needs runtime input(s) {missing}")
        idx = np.arange(self.n)
        q = self.layout.points(idx[:, None])
        k = self.layout.points(idx[None, :])
        out = np.empty((h, self.n, self.n), dtype=bool)
        cache: dict[int, np.ndarray] = {}
        for head in range(h):
            e = self.expr_for_head(head) if isinstance(self.attend, ByHead) else self.attend
            key = (id(e), head if content else None)  # routed selections differ per head
            if key not in cache:
                cache[key] = np.broadcast_to(
                    e.allowed(q, k, Env(self.layout, env_inputs, head, content or {})), (self.n, self.n))
            out[head] = cache[key]
        return out

    def to_attn(self) -> str:
        """Canonical ``.attn`` text; parsing it gives back an equal Pattern."""
        lines = [f"pattern {self.name} {{", f"    tokens {self.layout.to_attn()}"]
        if self.heads is not None:
            lines.append(f"    heads {self.heads}")
        for inp in self.inputs:
            lines.append("    " + inp.to_attn(self.n))
        body = self.attend.to_attn() if isinstance(self.attend, Expr) else self.attend.to_attn("    ")
        lines.append(f"    attend {body}")
        lines += ["    " + s for s in self.schedule.to_attn()]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_attn()


def _tile(value: Any, layout: Layout, which: str, out: list[Diagnostic], span: Span | None):
    if value is None:
        return None
    vals = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in vals):
        out.append(Diagnostic(f"schedule tile {which} = {value!r} must be positive integers", span,
                              "valid: an integer (1-D) or one integer per axis"))
        return None
    if len(vals) not in (1, layout.rank):
        out.append(Diagnostic(f"schedule tile {which} = {value!r} has {len(vals)} entries but the "
                              f"layout has {layout.rank} axes", span))
        return None
    return tuple(int(v) for v in vals)


def _bind_by_head(attend: ByHead, heads: int | None, layout: Layout, out: list[Diagnostic]):
    branches = sorted(attend.branches, key=lambda b: (b.lo, b.hi))
    if heads is None:
        out.append(Diagnostic("`by head` needs a `heads n` line", attend.span,
                              "add e.g. `heads 8` after the tokens line"))
        heads = max((b.hi for b in branches), default=0)
    covered = 0
    for b in branches:
        if b.lo >= b.hi:
            out.append(Diagnostic(f"head range {b.lo}..{b.hi} is empty", b.span, "write lo..hi with lo < hi"))
        elif b.lo < covered:
            out.append(Diagnostic(f"head range {b.lo}..{b.hi} overlaps heads {b.lo}..{min(covered, b.hi)}",
                                  b.span, f"ranges must cover 0..{heads} exactly once"))
        elif b.lo > covered:
            out.append(Diagnostic(f"heads {covered}..{b.lo} are not covered by any branch", b.span,
                                  f"ranges must cover 0..{heads} exactly once"))
        covered = max(covered, b.hi)
    if covered != heads and heads:
        # point at the range to change, not at `attend by head {`
        past = [b for b in branches if b.hi > heads]
        where = (past[0] if past else branches[-1]).span if branches else None
        message = (f"head range {past[0].lo}..{past[0].hi} goes past the pattern's {heads} heads" if past
                   else f"heads {covered}..{heads} are not covered by any branch")
        out.append(Diagnostic(message, where or attend.span, f"ranges must cover 0..{heads} exactly once"))
    # Canonical head order: every consumer may rely on branches sorted by their first head (the
    # Triton head switch tests `h < hi` in turn; a file may list the ranges in any order).
    bound = tuple(replace(b, expr=b.expr.bind(layout, out)) for b in branches)
    return ByHead(bound, attend.span), heads
