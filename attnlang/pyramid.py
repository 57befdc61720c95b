"""PSA pooled pyramids (docs/language.md §13.2): validation and the literal semantics, in numpy.

A ``pyramid(...)`` is a whole ``attend``. For one batch item and query head:

1. ``token_boxes`` (:mod:`attnlang.boxes`) numbers key blocks (shape ``block``) and query groups (shape ``query_block``)
   row-major on the token grid; boxes at the end of an axis are smaller;
2. ``eligible``: a block is eligible for a group when ``among`` allows at least one pair;
3. ``level_table``: eligible blocks are ranked by ``scale * mean(Q over group) . mean(K over
   block)`` (fp32, ties towards the lower block) and the rank slices ``[ceil(n F_(i-1)),
   ceil(n F_i))`` get ``levels[i]`` (``F`` = cumulative ``keep``, exact decimal arithmetic);
4. at level ``l`` a block's tokens, in its own row-major order, form consecutive groups of ``l``
   whose key/value is their mean and whose logit gains ``ln(l)``; a group is visible to ``q``
   only if ``among`` allows ``q`` every key of it (``token_structure`` gives this densely).

>>> import numpy as np
>>> from attnlang.pattern import Pattern, pyramid, causal
>>> p = Pattern.create(pyramid(4, 4, levels=[1, 2], keep=[0.5, 0.5], among=causal), tokens=16)
>>> rng = np.random.default_rng(0)
>>> q, k = rng.standard_normal((2, 1, 16, 8), dtype=np.float32)
>>> level_table(p.attend, p.layout, q, k, 8 ** -0.5)[0]   # [query groups, key blocks]
array([[1, 0, 0, 0],
       [1, 2, 0, 0],
       [2, 1, 1, 0],
       [1, 2, 2, 1]], dtype=int32)

This module is the oracle; ``attnlang.runtime.pyramid`` is the fast torch path, tested equal.
Selection is not differentiated (as in the paper): gradients flow through attention only.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any, Mapping

import numpy as np

from attnlang.boxes import box_order, token_boxes
from attnlang.errors import AttnError
from attnlang.pattern import Env, Layout, Pattern, Pyramid, Route, exact_fraction
from attnlang.plan import BlockTable, HeadGroup, Plan
from attnlang.routing import eligibility, segment_mean


# --------------------------------------------------------------------------------------------
# blocks, scores, eligibility, levels
# --------------------------------------------------------------------------------------------

def eligible(p: Pyramid, layout: Layout) -> np.ndarray:
    """bool ``[query groups, key blocks]``: ``among`` allows at least one pair between them.

    The same rule as route's (docs/language.md §13.1), so it is route's code: exact, from the planner's tile
    classes where the boxes allow, densely in bounded chunks otherwise.
    """
    return eligibility(Route(p.block, top=1, among=p.among, query_block=p.query_block), layout)


def level_bounds(p: Pyramid, n_max: int) -> np.ndarray:
    """int ``[n_max + 1, len(levels) + 1]``: rank boundaries ``ceil(n * F_i)`` for ``n`` eligible
    blocks, in exact rational arithmetic (``F_0 = 0``)."""
    cum = [Fraction(0)] + list(itertools.accumulate(exact_fraction(x) for x in p.keep))
    return np.array([[math.ceil(n * f) for f in cum] for n in range(n_max + 1)], dtype=np.int64)


def assign_levels(p: Pyramid, scores: np.ndarray, elig: np.ndarray) -> np.ndarray:
    """Levels ``[..., groups, blocks]`` (0 = skipped) from fp32 scores and eligibility.

    Ranks sort eligible blocks by descending score, ties towards the lower block number.
    """
    nk = scores.shape[-1]
    s = np.where(elig, scores, -np.inf)
    # lexsort's last key is primary: ineligible last, then score descending, then block.
    blocks = np.broadcast_to(np.arange(nk), s.shape)
    order = np.lexsort((blocks, -s, ~np.broadcast_to(elig, s.shape)), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(nk), s.shape), axis=-1)
    n = np.broadcast_to(elig.sum(axis=-1, keepdims=True), s.shape)
    bounds = level_bounds(p, nk)[n]  # [..., blocks, len(levels) + 1]
    which = (rank[..., None] >= bounds[..., 1:]).sum(axis=-1)  # level slot of each rank
    lv = np.asarray(p.levels + (0,), dtype=np.int32)
    return np.where(elig, lv[which], 0).astype(np.int32)


def level_table(p: Pyramid, layout: Layout, q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """int32 ``[Hq, query groups, key blocks]``: the level each head's group sees each block at
    (0 = skipped), for one batch item's ``q [Hq, N, D]`` and ``k [Hkv, N, D]`` (GQA: query head
    ``h`` reads KV head ``h // (Hq // Hkv)``)."""
    qids, nq = token_boxes(layout, p.query_block)
    kids, nk = token_boxes(layout, p.block)

    mq = segment_mean(np.asarray(q), qids, nq)
    mk = segment_mean(np.asarray(k), kids, nk)
    mk = np.repeat(mk, q.shape[0] // k.shape[0], axis=0)
    scores = np.float32(scale) * np.matmul(mq, mk.transpose(0, 2, 1))
    return assign_levels(p, scores.astype(np.float32), eligible(p, layout))


# --------------------------------------------------------------------------------------------
# the dense token structure (what the reference backend evaluates)
# --------------------------------------------------------------------------------------------

def pool_members(layout: Layout, p: Pyramid, level: int) -> np.ndarray:
    """int ``[N]``: the pooled group of every token at ``level`` — tokens sorted by block,
    row-major inside it, then cut into runs of ``level`` (levels divide every block)."""
    kids, nk = token_boxes(layout, p.block)
    order, _ = box_order(kids, nk)
    member = np.empty(layout.n, dtype=np.int64)
    member[order] = np.arange(layout.n) // level
    return member


def token_structure(p: Pyramid, layout: Layout, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(level [N, N] int32, visible [N, N] bool)`` for one head's ``table [groups, blocks]``:
    the level key ``k`` is seen at by query ``q`` (0 = not at all), and whether its pooled group
    is visible (``among`` allows ``q`` every key of the group). O(N²): the reference only."""
    qids, _ = token_boxes(layout, p.query_block)
    kids, _ = token_boxes(layout, p.block)
    level = table[qids[:, None], kids[None, :]]
    idx = np.arange(layout.n)
    among = np.broadcast_to(p.among.allowed(layout.points(idx[:, None]), layout.points(idx[None, :]),
                                            Env(layout)), (layout.n, layout.n))
    order, _ = box_order(kids, int(kids.max()) + 1)
    visible = np.zeros((layout.n, layout.n), dtype=bool)
    for lv in set(p.levels):
        # In block order a pooled group is `lv` consecutive keys: all() over them.
        groups = among[:, order].reshape(layout.n, layout.n // lv, lv).all(axis=-1)
        visible |= (level == lv) & groups[:, pool_members(layout, p, lv)]
    return level, visible



# --------------------------------------------------------------------------------------------
# call-time plans
# --------------------------------------------------------------------------------------------

def pattern_content(pattern: Pattern, q: np.ndarray, k: np.ndarray, scale: float | None = None) -> dict:
    """``{pyramid node: level table [Hq, groups, blocks]}`` for one batch item's ``q [Hq, N, D]``
    and ``k [Hkv, N, D]``: what :func:`attnlang.planner.make_plan` takes as ``content``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return {pattern.attend: level_table(pattern.attend, pattern.layout, q, k, scale)}


def plan(pattern: Pattern, content: Mapping[Any, np.ndarray] | None, block_m: int, block_n: int) -> Plan:
    """The tile plan of a pyramid for one batch item: one head group per query head, natural
    order; a tile pair is visited when it touches a (query group, key block) pair given a level.
    Every visited tile is partial (pooled keys and visibility need per-element work); the level
    table itself is ``plan.levels``.
    """
    p, layout, n = pattern.attend, pattern.layout, pattern.layout.n
    if not content or p not in content:
        raise AttnError(f"pattern '{pattern.name}' is a pyramid(...): it reads Q/K, so it is planned per call",
                        hint="call attnlang.compile(...)(q, k, v), or pass "
                             "content=attnlang.pyramid.pattern_content(pattern, q, k) to make_plan")
    table = np.asarray(content[p])
    qt, kt = -(-n // block_m), -(-n // block_n)

    def touched(box: tuple[int, ...], tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Tiles each box touches, grouped by box: ``(tiles, indptr)``."""
        ids, count = token_boxes(layout, box)
        u = np.unique((np.arange(n) // tile) * count + ids)
        tiles, which = np.divmod(u, count)
        order = np.argsort(which, kind="stable")
        return tiles[order], np.searchsorted(which[order], np.arange(count + 1))

    (qtiles, qptr), (ktiles, kptr) = touched(p.query_block, block_m), touched(p.block, block_n)
    empty = BlockTable.from_pairs(np.zeros(0), np.zeros(0), qt, kt)
    groups = []
    for h in range(table.shape[0]):
        g, j = np.nonzero(table[h])
        cg, cj = qptr[g + 1] - qptr[g], kptr[j + 1] - kptr[j]
        per = cg * cj
        rep = np.repeat(np.arange(len(g)), per)
        local = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
        a, b = np.divmod(local, np.maximum(cj[rep], 1))
        pairs = np.unique(qtiles[qptr[g[rep]] + a] * kt + ktiles[kptr[j[rep]] + b])
        part = BlockTable.from_pairs(pairs // kt, pairs % kt, qt, kt)
        groups.append(HeadGroup.of(h, h + 1, part, empty))
    used = {lv: int((table == lv).sum()) for lv in sorted(set(p.levels))}
    notes = ("pyramid: planned at call time from this batch item's Q/K, one head group per query head, "
             "natural order; every visited tile is partial (pooled keys)",
             "(group, block) pairs per level over all heads: "
             + ", ".join(f"level {lv}: {c}" for lv, c in used.items())
             + f", skipped: {int((table == 0).sum())}")
    return Plan(pattern, block_m, block_n, (block_m,), (block_n,), None, tuple(groups), notes, None, table)
