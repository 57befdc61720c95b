"""The Pattern IR, one module per idea (``attnlang.pattern`` re-exports all of it):

* :mod:`~attnlang.ir.layout` — the token grid (:class:`Layout`), points and :class:`Env`;
* :mod:`~attnlang.ir.expr` — the :class:`Expr` base, ``full``/``none``, ``& | ~`` combinators;
* :mod:`~attnlang.ir.bind` — helpers shared by every node's ``bind`` and ``to_attn``;
* :mod:`~attnlang.ir.primitives` — the static primitives (flat, per-axis, runtime inputs);
* :mod:`~attnlang.ir.natten` — NATTEN window arithmetic; :mod:`~attnlang.ir.rng` — random blocks;
* :mod:`~attnlang.ir.route` — ``route`` and its box geometry;
* :mod:`~attnlang.ir.pattern` — :class:`Pattern`, heads, inputs, schedule, ``pyramid``;
* :mod:`~attnlang.ir.builders` — the Python builders (``causal & sliding(256)``);
* :mod:`~attnlang.ir.nodes` — the primitive list every consumer's table is checked against.

Imports point one way: layout <- expr <- bind <- primitives <- route <- pattern <- builders.
"""
