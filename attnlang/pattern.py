"""The Pattern IR: what each query may see, with exact semantics and no notion of tiles.

An expression tree (:class:`Expr`) of primitives (docs/language.md §4) combined with ``&``, ``|``,
``-`` and ``~``, bound to a token :class:`Layout` inside a :class:`Pattern`. Every node has
``allowed(q, k, env)``: a vectorised predicate over token coordinates, which *is* the meaning of
the language. The dense reference, the planner's property tests and every backend are measured
against it.

Python builders are plain values and functions of this module::

    >>> from attnlang import causal, sliding, Pattern
    >>> p = Pattern.create(causal & sliding(2), tokens=6)
    >>> p.mask()[0].astype(int)[3]
    array([0, 1, 1, 1, 0, 0])

Nodes store per-axis arguments as the user gave them (a scalar or a tuple); ``Pattern.create``
binds the expression to the layout once, turning every per-axis scalar into a tuple of the
layout's rank and collecting every validation error with its source span. Code past that
boundary (planner, codegen, backends) may assume bound, canonical nodes.

The code lives in :mod:`attnlang.ir`, one module per idea; this module re-exports it so that
``from attnlang.pattern import ...`` keeps working everywhere.
"""
from __future__ import annotations

from attnlang.ir.builders import (
    axial, block, causal, full, global_, grid, halo, keys, neighborhood, none, pyramid, queries,
    random, route, same, sink, sliding, strided, valid, window,
)
from attnlang.ir.expr import INF, And, Empty, Expr, Full, Not, Or, PerAxis, and_, not_, or_
from attnlang.ir.layout import DEFAULT_AXIS_NAMES, Axis, Env, Layout, Points
from attnlang.ir.natten import natten_window
from attnlang.ir.nodes import COMBINATORS, NODES, PRIMITIVES  # noqa: F401
from attnlang.ir.pattern import (
    ORDERS, ByHead, HeadRange, Input, Pattern, Pyramid, Schedule, block_sizes, exact_fraction,
)
from attnlang.ir.primitives import (
    Axial, Block, Causal, Grid, Halo, Indices, Keys, Neighborhood, Queries, Random, Range, Same,
    Selection, Strided, Valid, Window,
)
from attnlang.ir.rng import random_blocks
from attnlang.ir.route import SCOPES, Route, box_ids

__all__ = [
    "INF", "Axis", "Layout", "Points", "Env", "Expr", "Full", "Empty", "Causal", "Window", "Range",
    "Indices", "Keys", "Queries", "Random", "Neighborhood", "Block", "Strided", "Grid", "Axial",
    "Halo", "Same", "Valid", "And", "Or", "Not", "HeadRange", "ByHead", "Input", "Schedule",
    "Pattern", "ORDERS", "and_", "or_", "not_", "natten_window", "random_blocks", "full", "none",
    "causal", "window", "sliding", "neighborhood", "block", "strided", "grid", "axial", "halo",
    "keys", "queries", "global_", "sink", "random", "same", "valid", "PRIMITIVES",
    "Pyramid", "pyramid",
    "Route", "route", "box_ids", "SCOPES",
]
