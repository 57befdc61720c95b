"""Allowed ``(q, k)`` pairs of a plan: the one place they are counted.

Every report of allowed pairs or density (the simulator's ``flop_bound``, ``attnlang simulate``)
asks :func:`allowed_pairs`, which takes the cheapest exact source that applies, in this order:

1. the count the planner made while planning (``Plan.allowed_pairs``: O(N), for bands and
   per-axis primitives on axes up to 2048);
2. a pyramid's level table;
3. the sympy closed form (:mod:`attnlang.closed_form`) of a pattern without inputs or content;
4. the plan's own tiles: full tiles by area, partial tiles by evaluating the pattern on their
   elements only (O(visited work)).

tests/plan/test_pairs.py checks that every source that applies gives the dense mask's count.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from attnlang.boxes import token_boxes
from attnlang.pattern import Env
from attnlang.plan import HeadGroup, Plan


def allowed_pairs(plan: Plan, group: HeadGroup, inputs: Mapping[str, Any] | None = None,
                  content: Mapping[Any, np.ndarray] | None = None) -> int:
    """Allowed pairs of one head group of ``plan`` (made for ``inputs``/``content``).

    A pyramid counts (query, pooled key) pairs from its level table: a key block seen at level
    ``l`` is ``|block| / l`` keys (the work the pooled keys cost).
    """
    if plan.allowed_pairs is not None:
        return int(plan.allowed_pairs[plan.groups.index(group)])
    p = plan.pattern
    if plan.levels is not None:
        qsize = np.bincount(token_boxes(p.layout, p.attend.query_block)[0])
        ksize = np.bincount(token_boxes(p.layout, p.attend.block)[0])
        lv = np.asarray(plan.levels[group.lo], dtype=np.float64)
        per = np.divide(1.0, lv, out=np.zeros_like(lv), where=lv > 0)
        return int(round(float(qsize @ per @ ksize)))
    if not p.inputs and not p.reads_content:
        from attnlang.closed_form import derive  # function-level: sympy, only when a count needs it

        cf = derive(p, group.lo)
        if cf is not None:  # exact and O(1) where the planner had no O(N) count (axes > 2048)
            return cf.count()
    return _from_tiles(plan, group, inputs, content)


def _from_tiles(plan: Plan, group: HeadGroup, inputs: Mapping[str, Any] | None,
                content: Mapping[Any, np.ndarray] | None) -> int:
    """Full tiles by area plus the pattern evaluated on the partial tiles' elements."""
    p = plan.pattern
    order = np.arange(plan.n) if plan.order is None else np.asarray(plan.order)
    qpos, kpos = _pad(order, plan.q_tiles * plan.block_m), _pad(order, plan.kv_tiles * plan.block_n)
    expr = p.expr_for_head(group.lo)
    env = Env(p.layout, {k: np.asarray(v) for k, v in (inputs or {}).items()}, group.lo, content or {})
    total = group.full.nnz * plan.block_m * plan.block_n
    rows = np.repeat(np.arange(group.partial.rows), group.partial.counts())
    cols = group.partial.indices.astype(np.int64)
    chunk = max(1, (1 << 22) // (plan.block_m * plan.block_n))
    qoff, koff = np.arange(plan.block_m), np.arange(plan.block_n)
    for s in range(0, len(rows), chunk):
        qi = qpos[rows[s:s + chunk, None] * plan.block_m + qoff][:, :, None]
        ki = kpos[cols[s:s + chunk, None] * plan.block_n + koff][:, None, :]
        ok = (qi >= 0) & (ki >= 0)
        allowed = expr.allowed(p.layout.points(np.maximum(qi, 0)), p.layout.points(np.maximum(ki, 0)), env)
        total += int((allowed & ok).sum())
    return total


def _pad(order: np.ndarray, length: int) -> np.ndarray:
    """Kernel position -> token index, padded with -1 (no token) to whole tiles."""
    return np.concatenate([order, np.full(length - len(order), -1, dtype=order.dtype)])


__all__ = ["allowed_pairs"]
