"""Pass 1, lower: the Pattern IR as planner terms (bands with causal/window merged, per-axis
products, token-set leaves, joins, and/or/not). Pure: ``lower(expr, layout) -> Term``.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Term:
    """A planner term: ``op`` in full, none, band, axes, keys, queries, valid, random, same,
    and, or, not."""

    op: str
    arg: Any = None
    items: tuple["Term", ...] = ()


def lower(e: Expr, layout: Layout) -> Term:
    """Pattern IR -> planner terms; conjunctions merge their bands and their per-axis factors."""
    if isinstance(e, Full):
        return Term("full")
    if isinstance(e, Empty):
        return Term("none")
    if isinstance(e, Causal) and e.axis is None:
        return Term("band", Band(-INF, 0))
    if isinstance(e, Window):
        return Term("band", Band(-e.before, e.after))
    if isinstance(e, (Keys, Queries, Valid, Random, Same, Route)):
        return Term(type(e).__name__.lower(), e)
    if isinstance(e, Not):
        return Term("not", items=(lower(e.item, layout),))
    if isinstance(e, Or):
        return Term("or", items=tuple(lower(i, layout) for i in e.items))
    if isinstance(e, And):
        band, axes, rest = None, None, []
        for t in (lower(i, layout) for i in e.items):
            if t.op == "band":
                band = t.arg if band is None else band & t.arg
            elif t.op == "axes":
                axes = t.arg if axes is None else Axes(tuple(a + b for a, b in zip(axes.preds, t.arg.preds)))
            else:
                rest.append(t)
        if band is not None and band.empty:
            return Term("none")
        items = ([Term("band", band)] if band is not None else []) + \
                ([Term("axes", axes)] if axes is not None else []) + rest
        return items[0] if len(items) == 1 else Term("and", items=tuple(items))
    f = factor(e, layout)
    if f is None:
        raise AttnError(f"the planner does not support {type(e).__name__} ({e.to_attn()})",
                        hint="content-dependent patterns are planned by the runtime from Q and K")
    return Term("axes", Axes(f))
