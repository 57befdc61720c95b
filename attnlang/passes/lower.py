"""Pass 1, lower: the Pattern IR as planner terms (bands with causal/window merged, per-axis
products, token-set leaves, joins, and/or/not). Pure: ``lower(expr, layout) -> Term``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from attnlang.errors import AttnError
from attnlang.pattern import (
    INF, And, Causal, Empty, Expr, Full, Keys, Layout, Not, Or, Queries, Random, Same,
    Valid, Window,
)
from attnlang.pattern import Route
from attnlang.tiling import AxisPred, Band, factor


# --------------------------------------------------------------------------------------------
# lower: the Pattern IR as planner terms
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Axes:
    """A conjunction of per-axis primitives: one tuple of 1-D predicates per axis."""

    preds: tuple[tuple[AxisPred, ...], ...]


class Op(str, Enum):
    """What a planner :class:`Term` is (a ``str`` enum: traces and reprs stay readable)."""

    FULL = "full"
    NONE = "none"
    BAND = "band"
    AXES = "axes"
    KEYS = "keys"
    QUERIES = "queries"
    VALID = "valid"
    RANDOM = "random"
    SAME = "same"
    ROUTE = "route"
    AND = "and"
    OR = "or"
    NOT = "not"


@dataclass(frozen=True)
class Term:
    """A planner term: ``op`` in full, none, band, axes, keys, queries, valid, random, same,
    and, or, not."""

    op: Op
    arg: Any = None
    items: tuple["Term", ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "op", Op(self.op))  # a misspelt op fails here, not as a wrong plan


def lower(e: Expr, layout: Layout) -> Term:
    """Pattern IR -> planner terms; conjunctions merge their bands and their per-axis factors."""
    if isinstance(e, Full):
        return Term(Op.FULL)
    if isinstance(e, Empty):
        return Term(Op.NONE)
    if isinstance(e, Causal) and e.axis is None:
        return Term(Op.BAND, Band(-INF, 0))
    if isinstance(e, Window):
        return Term(Op.BAND, Band(-e.before, e.after))
    if isinstance(e, (Keys, Queries, Valid, Random, Same, Route)):
        return Term(Op(e.keyword), e)
    if isinstance(e, Not):
        return Term(Op.NOT, items=(lower(e.item, layout),))
    if isinstance(e, Or):
        return Term(Op.OR, items=tuple(lower(i, layout) for i in e.items))
    if isinstance(e, And):
        band, axes, rest = None, None, []
        for t in (lower(i, layout) for i in e.items):
            if t.op == Op.BAND:
                band = t.arg if band is None else band & t.arg
            elif t.op == Op.AXES:
                axes = t.arg if axes is None else Axes(tuple(a + b for a, b in zip(axes.preds, t.arg.preds)))
            else:
                rest.append(t)
        if band is not None and band.empty:
            return Term(Op.NONE)
        items = ([Term(Op.BAND, band)] if band is not None else []) + \
                ([Term(Op.AXES, axes)] if axes is not None else []) + rest
        return items[0] if len(items) == 1 else Term(Op.AND, items=tuple(items))
    f = factor(e, layout)
    if f is None:
        raise AttnError(f"the planner does not support {type(e).__name__} ({e.to_attn()})",
                        hint="content-dependent patterns are planned by the runtime from Q and K")
    return Term(Op.AXES, Axes(f))
