"""The primitive list: every node type of the Pattern IR, the list each consumer's table is
checked against (tests/ir/test_tables.py).

A consumer of the IR keeps one table keyed by node type (see docs/_arch_tables.md for the list)
and, next to it, a ``*_LEAVES_OUT`` mapping naming the node types it deliberately does not
handle and why. Adding a node type here without a row in every table fails that test.
"""
from __future__ import annotations

from attnlang.ir.expr import And, Empty, Full, Not, Or
from attnlang.ir.primitives import (
    Axial, Block, Causal, Grid, Halo, Keys, Neighborhood, Queries, Random, Same, Strided, Valid, Window,
)
from attnlang.ir.route import Route

PRIMITIVES: tuple[type, ...] = (
    Full, Empty, Causal, Window, Neighborhood, Block, Strided, Grid, Axial, Halo, Keys, Queries,
    Random, Same, Valid, Route,
)
COMBINATORS: tuple[type, ...] = (And, Or, Not)
NODES: tuple[type, ...] = PRIMITIVES + COMBINATORS  # every Expr a bound pattern may hold

_PRIM_NAMES: dict[type, str] = {t: t.keyword for t in PRIMITIVES}

__all__ = ["PRIMITIVES", "COMBINATORS", "NODES"]
