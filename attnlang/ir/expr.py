"""The expression base class, the constants ``full``/``none`` and the combinators ``& | ~``.

Every node is a frozen dataclass with ``allowed`` (its meaning), ``bind`` (layout-dependent
validation and normalisation) and ``to_attn`` (its canonical text); ``keyword`` names the
primitive in the language. :mod:`attnlang.ir.nodes` lists every node type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from attnlang.errors import Diagnostic, Span
from attnlang.ir.layout import Env, Layout, Points

INF = math.inf
PerAxis = Any  # int | tuple[int, ...] before binding; tuple[int, ...] after


def _span() -> Any:
    return field(default=None, compare=False, repr=False)


class Expr:
    """Base of every pattern expression; combine with ``&``, ``|``, ``-`` and ``~``."""

    span: Span | None

    def allowed(self, q: Points, k: Points, env: Env) -> np.ndarray:
        """Boolean array broadcast over ``q`` and ``k``: may query ``q`` see key ``k``."""
        raise NotImplementedError(type(self).__name__)

    def bind(self, layout: Layout, out: list[Diagnostic]) -> "Expr":
        """Normalise per-axis arguments to the layout's rank; append problems to ``out``."""
        return self

    def children(self) -> tuple["Expr", ...]:
        return ()

    def to_attn(self) -> str:
        raise NotImplementedError(type(self).__name__)

    def walk(self) -> Iterator["Expr"]:
        yield self
        for c in self.children():
            yield from c.walk()

    def __and__(self, other: "Expr") -> "Expr":
        return and_(self, _expr(other))

    def __or__(self, other: "Expr") -> "Expr":
        return or_(self, _expr(other))

    def __sub__(self, other: "Expr") -> "Expr":
        return and_(self, not_(_expr(other)))

    def __invert__(self) -> "Expr":
        return not_(self)

    def __str__(self) -> str:
        return self.to_attn()


def _expr(x: Any) -> Expr:
    if not isinstance(x, Expr):
        raise TypeError(f"cannot combine a pattern with {type(x).__name__} {x!r}")
    return x


# --- constants ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Full(Expr):
    """Every query sees every key (``full``)."""

    keyword = "full"  # the name in the language

    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.ones(np.broadcast_shapes(q.flat.shape, k.flat.shape), dtype=bool)

    def to_attn(self):
        return "full"


@dataclass(frozen=True)
class Empty(Expr):
    """No query sees any key (``none``)."""

    keyword = "none"  # the name in the language

    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.zeros(np.broadcast_shapes(q.flat.shape, k.flat.shape), dtype=bool)

    def to_attn(self):
        return "none"


# --- combinators --------------------------------------------------------------------------

@dataclass(frozen=True)
class And(Expr):
    """Both (all) sub-patterns allow the pair (``a & b``, and ``a - b`` as ``a & ~b``)."""

    items: tuple[Expr, ...]
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = self.items[0].allowed(q, k, env)
        for it in self.items[1:]:
            ok = ok & it.allowed(q, k, env)
        return ok

    def bind(self, layout, out):
        return and_(*(it.bind(layout, out) for it in self.items), span=self.span)

    def children(self):
        return self.items

    def to_attn(self):
        parts = []
        for i, it in enumerate(self.items):
            if i > 0 and isinstance(it, Not):
                parts.append(" - " + _paren(it.item, Or, And))
            else:
                parts.append((" & " if i else "") + _paren(it, Or))
        return "".join(parts)


@dataclass(frozen=True)
class Or(Expr):
    """Either (any) sub-pattern allows the pair (``a | b``)."""

    items: tuple[Expr, ...]
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = self.items[0].allowed(q, k, env)
        for it in self.items[1:]:
            ok = ok | it.allowed(q, k, env)
        return ok

    def bind(self, layout, out):
        return or_(*(it.bind(layout, out) for it in self.items), span=self.span)

    def children(self):
        return self.items

    def to_attn(self):
        return " | ".join(it.to_attn() for it in self.items)


@dataclass(frozen=True)
class Not(Expr):
    """The complement (``~a``)."""

    item: Expr
    span: Span | None = _span()

    def allowed(self, q, k, env):
        return ~self.item.allowed(q, k, env)

    def bind(self, layout, out):
        return not_(self.item.bind(layout, out), span=self.span)

    def children(self):
        return (self.item,)

    def to_attn(self):
        return "~" + _paren(self.item, Or, And)


def _paren(e: Expr, *kinds: type) -> str:
    s = e.to_attn()
    return f"({s})" if isinstance(e, kinds) else s


def and_(*items: Expr, span: Span | None = None) -> Expr:
    """Canonical conjunction: flattened, ``full`` dropped, ``none`` absorbing."""
    flat: list[Expr] = []
    for it in items:
        if isinstance(it, And):
            flat.extend(it.items)
        elif isinstance(it, Empty):
            return Empty(span=span)
        elif not isinstance(it, Full):
            flat.append(it)
    if not flat:
        return Full(span=span)
    return flat[0] if len(flat) == 1 else And(tuple(flat), span=span)


def or_(*items: Expr, span: Span | None = None) -> Expr:
    """Canonical disjunction: flattened, ``none`` dropped, ``full`` absorbing."""
    flat: list[Expr] = []
    for it in items:
        if isinstance(it, Or):
            flat.extend(it.items)
        elif isinstance(it, Full):
            return Full(span=span)
        elif not isinstance(it, Empty):
            flat.append(it)
    if not flat:
        return Empty(span=span)
    return flat[0] if len(flat) == 1 else Or(tuple(flat), span=span)


def not_(item: Expr, span: Span | None = None) -> Expr:
    """Canonical complement: ``~~a == a``, ``~full == none``, ``~none == full``."""
    if isinstance(item, Not):
        return item.item
    if isinstance(item, Full):
        return Empty(span=span)
    if isinstance(item, Empty):
        return Full(span=span)
    return Not(item, span=span)
