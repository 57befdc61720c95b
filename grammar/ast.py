"""The syntax tree of a ``.attn`` file: one frozen dataclass per grammar rule, each with a Span.

This is the *untyped* tree (what the user wrote, names unresolved, sizes unevaluated); the
checker (:mod:`attnlang.grammar.check`) turns it into the Pattern IR. Spans never take part in
equality, so two files that differ only in layout, comments or redundant parentheses have equal
trees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from attnlang.errors import Source, Span


def _span():
    return field(default=None, compare=False, repr=False)


# --- expressions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Name:
    """A bare name: a constant, parameter, macro, primitive or axis (``W``, ``causal``, ``t``)."""

    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class IntLit:
    """An integer literal (``256``)."""

    value: int
    span: Span | None = _span()


@dataclass(frozen=True)
class FloatLit:
    """A float literal (``0.25``); only valid where a parameter takes a float."""

    value: float
    span: Span | None = _span()


@dataclass(frozen=True)
class BoolLit:
    """``true`` or ``false``."""

    value: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class InfLit:
    """``inf`` (unbounded window sides)."""

    span: Span | None = _span()


@dataclass(frozen=True)
class TupleLit:
    """``(a, b, c)``: per-axis values."""

    items: tuple["Expr", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class ListLit:
    """``[x, y]``: index lists and tables indexed with ``xs[i]``."""

    items: tuple["Expr", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Index:
    """``target[index]``."""

    target: "Expr"
    index: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Arg:
    """One call argument, positional (``name is None``) or named (``size = 32``)."""

    name: str | None
    value: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    """``func(args)``: a primitive, a macro, ``min``/``max``, or a schedule directive."""

    func: str
    args: tuple[Arg, ...]
    span: Span | None = _span()
    func_span: Span | None = _span()


@dataclass(frozen=True, eq=False)
class BinOp:
    """``left op right`` with op one of ``| & - + * // %``.

    Equality and hashing walk the left spine in a loop: a flat chain ``a & b & c ...`` of
    thousands of terms is a left-deep tree, which the generated recursive methods cannot compare.
    """

    op: str
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()

    def spine(self) -> tuple[list["BinOp"], "Expr"]:
        """The operators of the left-deep chain from this one down, and the leftmost operand."""
        ops, e = [], self
        while isinstance(e, BinOp):
            ops.append(e)
            e = e.left
        return ops, e

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BinOp):
            return NotImplemented
        (xs, x0), (ys, y0) = self.spine(), other.spine()
        return (len(xs) == len(ys) and all(a.op == b.op and a.right == b.right for a, b in zip(xs, ys))
                and x0 == y0)

    def __hash__(self) -> int:
        ops, first = self.spine()
        return hash((first, tuple((b.op, b.right) for b in ops)))


@dataclass(frozen=True)
class UnaryOp:
    """``~a`` (complement) or ``-x`` (negation)."""

    op: str
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class RangeExpr:
    """``lo..hi`` (half-open)."""

    lo: "Expr"
    hi: "Expr"
    span: Span | None = _span()


Expr = Union[Name, IntLit, FloatLit, BoolLit, InfLit, TupleLit, ListLit, Index, Call, BinOp,
             UnaryOp, RangeExpr]


# --- declarations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A pattern or macro parameter with an optional default (``r = W``)."""

    name: str
    default: Expr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Let:
    """``let NAME = expr`` at file level or inside a pattern."""

    name: str
    value: Expr
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Def:
    """``def NAME(params) = expr``: a macro, expanded where it is called."""

    name: str
    params: tuple[Param, ...] | None  # None: written without parentheses
    body: Expr
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class AxisDecl:
    """``t[T]`` in a tokens line."""

    name: str
    size: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Tokens:
    """``tokens t[T], h[H], w[W]``."""

    axes: tuple[AxisDecl, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Heads:
    """``heads n``."""

    count: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Input:
    """``input doc: ids[N]`` or ``input len: length``."""

    name: str
    kind: str
    size: Expr | None
    span: Span | None = _span()
    kind_span: Span | None = _span()


@dataclass(frozen=True)
class Attend:
    """``attend expr``."""

    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class HeadBranch:
    """``lo..hi: expr`` inside ``attend by head { ... }``."""

    heads: Expr
    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class AttendByHead:
    """``attend by head { branches }``; ``word`` is what followed ``by`` (must be ``head``)."""

    word: str
    branches: tuple[HeadBranch, ...]
    span: Span | None = _span()
    word_span: Span | None = _span()


@dataclass(frozen=True)
class Schedule:
    """``schedule tile(q = ..., kv = ...)`` or ``schedule order(name)``."""

    directive: Call
    span: Span | None = _span()


Stmt = Union[Tokens, Heads, Input, Attend, AttendByHead, Schedule, Let]


@dataclass(frozen=True)
class PatternDecl:
    """``pattern NAME(params) { statements }``."""

    name: str
    params: tuple[Param, ...] | None
    body: tuple[Stmt, ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


Item = Union[Let, Def, PatternDecl]


@dataclass(frozen=True)
class Comment:
    """A ``# ...`` comment (kept for the formatter; no part of the meaning)."""

    text: str
    span: Span | None = _span()


@dataclass(frozen=True)
class File:
    """A whole ``.attn`` file: its items in order, and its comments (for ``attnlang fmt``)."""

    items: tuple[Item, ...]
    span: Span | None = _span()
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
    source: Source | None = field(default=None, compare=False, repr=False)


def walk(e: Expr):
    """Every node of an expression, in source order (pre-order), without recursion."""
    stack = [e]
    while stack:
        e = stack.pop()
        yield e
        if isinstance(e, Call):
            stack.extend(a.value for a in reversed(e.args))
        elif isinstance(e, (TupleLit, ListLit)):
            stack.extend(reversed(e.items))
        elif isinstance(e, Index):
            stack += (e.index, e.target)
        elif isinstance(e, BinOp):
            stack += (e.right, e.left)
        elif isinstance(e, UnaryOp):
            stack.append(e.operand)
        elif isinstance(e, RangeExpr):
            stack += (e.hi, e.lo)
