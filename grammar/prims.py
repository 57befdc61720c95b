"""The primitive table: each language primitive is one entry naming its parameters, their kinds
and defaults, and the Pattern IR node it builds (docs/language.md §4, §7).

Adding a primitive is one :class:`Primitive` entry here plus one node class in
``attnlang/pattern.py``; the checker does name resolution, arity, keywords and type checks from
the table, and the node's ``bind`` does the layout-dependent validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from attnlang.pattern import Pyramid
from attnlang.pattern import Route
from attnlang.pattern import (
    INF, Axial, Block, Causal, Empty, Full, Grid, Halo, Keys, Neighborhood, Queries, Random, Range,
    Same, Strided, Valid, Window, or_,
)

REQUIRED = object()  # marks a parameter without a default

# Parameter kinds and what the user reads when a value has the wrong type.
KINDS = {
    "int": "an integer",
    "int_or_inf": "an integer or inf",
    "side": "a non-negative integer or inf",
    "per_axis_int": "an integer or a tuple of integers (one per axis)",
    "per_axis_bool": "a boolean or a tuple of booleans (one per axis)",
    "axis": "an axis name of the tokens line",
    "input": "the name of an input declared in the pattern",
    "selection": "a range lo..hi or a list of token indices [i, j, ...]",
    "float": "a number",
    "int_list": "a list of integers [a, b, ...]",
    "float_list": "a list of numbers [a, b, ...]",
    "pattern": "a pattern expression such as causal",
    "scope": "query or head",
    "permute": "none or importance(segment = S)",
    "int_opt": "an integer",
}
NAME_KINDS = ("axis", "input", "scope")  # a bare name in these positions is taken literally


@dataclass(frozen=True)
class Param:
    """One primitive parameter: name, kind (a key of KINDS) and default."""

    name: str
    kind: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Primitive:
    """A language primitive: its parameters and ``build(span=..., **args) -> Expr``."""

    name: str
    params: tuple[Param, ...]
    build: Callable[..., Any]


def _table(*prims: Primitive) -> dict[str, Primitive]:
    return {p.name: p for p in prims}


PRIMITIVES: dict[str, Primitive] = _table(
    Primitive("full", (), lambda span: Full(span=span)),
    Primitive("none", (), lambda span: Empty(span=span)),
    Primitive("causal", (Param("axis", "axis", None),), lambda axis, span: Causal(axis, span=span)),
    Primitive("window", (Param("before", "side", INF), Param("after", "side", INF)),
              lambda before, after, span: Window(before, after, span=span)),
    Primitive("sliding", (Param("r", "side"),), lambda r, span: Window(r, r, span=span)),
    Primitive("neighborhood",
              (Param("window", "per_axis_int"), Param("dilation", "per_axis_int", 1),
               Param("stride", "per_axis_int", 1), Param("causal", "per_axis_bool", False)),
              lambda window, dilation, stride, causal, span:
              Neighborhood(window, dilation, stride, causal, span=span)),
    Primitive("block", (Param("size", "per_axis_int"), Param("shift", "per_axis_int", 0)),
              lambda size, shift, span: Block(size, shift, span=span)),
    Primitive("strided", (Param("step", "per_axis_int"),), lambda step, span: Strided(step, span=span)),
    Primitive("grid", (Param("size", "per_axis_int"),), lambda size, span: Grid(size, span=span)),
    Primitive("axial", (Param("axis", "axis"),), lambda axis, span: Axial(axis, span=span)),
    Primitive("halo", (Param("block", "per_axis_int"), Param("halo", "per_axis_int")),
              lambda block, halo, span: Halo(block, halo, span=span)),
    Primitive("keys", (Param("sel", "selection"),), lambda sel, span: Keys(sel, span=span)),
    Primitive("queries", (Param("sel", "selection"),), lambda sel, span: Queries(sel, span=span)),
    Primitive("global", (Param("sel", "selection"),),
              lambda sel, span: or_(Queries(sel, span=span), Keys(sel, span=span), span=span)),
    Primitive("sink", (Param("n", "int"),), lambda n, span: Keys(Range(0, n), span=span)),
    Primitive("random", (Param("block", "int"), Param("count", "int"), Param("seed", "int", 0)),
              lambda block, count, seed, span: Random(block, count, seed, span=span)),
    Primitive("same", (Param("input", "input"),), lambda input, span: Same(input, span=span)),
    Primitive("valid", (Param("input", "input"),), lambda input, span: Valid(input, span=span)),
    # A whole attend (not an Expr): the checker refuses it inside & | - ~ (docs/language.md §13.2).
    Primitive("pyramid",
              (Param("block", "per_axis_int"), Param("query_block", "per_axis_int", 1),
               Param("levels", "int_list", [1, 2, 4, 8]), Param("keep", "float_list"),
               Param("among", "pattern", Full())),
              lambda block, query_block, levels, keep, among, span:
              Pyramid(block, tuple(keep), query_block, tuple(levels), among, span=span)),
)

# Content-dependent routing (docs/language.md §13.1); `top` and `threshold`: exactly one (Route.bind).
PRIMITIVES["route"] = Primitive(
    "route",
    (Param("block", "per_axis_int"), Param("top", "int_opt", None), Param("threshold", "float", None),
     Param("among", "pattern", Full()), Param("query_block", "per_axis_int", 1),
     Param("scope", "scope", "query"), Param("permute_keys", "permute", None)),
    lambda block, top, threshold, among, query_block, scope, permute_keys, span:
    Route(block, top, threshold, among, query_block, scope, permute_keys, span=span))

BUILTINS = ("min", "max")  # integer functions
