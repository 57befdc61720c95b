"""The top of planning: Pattern -> Plan without evaluating the N x N mask.

:func:`make_plan` checks the runtime inputs and splits the three kinds of pattern once:
``pyramid(...)`` goes to :func:`attnlang.pyramid.plan`, patterns with ``route`` are planned per
head from their content (:func:`_plan_routed`), static patterns pick tile shapes and a token
order here and run the static passes, one module each in :mod:`attnlang.passes`::

    lower        passes/lower.py       Pattern IR -> planner terms: bands (causal/window merged),
                                       per-axis products, token-set leaves, joins, and/or/not
    tiles        passes/tiles.py       the ordering and both sides' tiles as sets of tokens (Ctx)
    candidates   passes/candidates.py  per query tile, the key tiles that may be non-empty (a
                                       superset from each term's key reach; joins: passes/joins.py)
    classify     passes/classify.py    EMPTY / PARTIAL / FULL of every candidate, exact per
                                       primitive, three-valued logic across terms; plan_group
                                       gives one head group's CSR tables
    closed forms passes/closed_forms.py  analytic tile ranges (sympy) for 1-D bands, pair counts

    >>> from attnlang import Pattern, causal, sliding
    >>> from attnlang.planner import make_plan
    >>> plan = make_plan(Pattern.create(causal & sliding(256), tokens=4096))
    >>> plan.stats()["visited"], plan.stats()["full"]
    (310, 186)
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping

import numpy as np

from attnlang.errors import AttnError
from attnlang.order import Ordering, rcm_order
from attnlang.passes.classify import plan_group
from attnlang.passes.closed_forms import allowed_pairs, analytic_ranges, band_blocks
from attnlang.passes.lower import Axes, Term, lower
from attnlang.passes.tiles import BLOCK_SIZES, Ctx, check_inputs, check_rows
from attnlang.pattern import Expr, Layout, Neighborhood, Pattern, ORDERS
from attnlang.pattern import Pyramid, Route
from attnlang.plan import HeadGroup, Plan
from attnlang.pyramid import plan as pyramid_plan

DEFAULT_BLOCK = 64

# --------------------------------------------------------------------------------------------
# Tile shapes and order
# --------------------------------------------------------------------------------------------

def _pow2_ok(v: int) -> bool:
    return isinstance(v, (int, np.integer)) and v in BLOCK_SIZES


def _check_block(name: str, v: Any) -> int:
    if not _pow2_ok(v):
        raise AttnError(f"{name} = {v!r} is not a supported tile size",
                        hint=f"valid: a power of two in {', '.join(map(str, BLOCK_SIZES))}")
    return int(v)


def _check_box(name: str, box: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    if len(box) != layout.rank or math.prod(box) not in BLOCK_SIZES:
        raise AttnError(
            f"schedule tile {name} = {box} is not a valid box for tokens {layout.to_attn()}",
            hint=f"give {layout.rank} extents whose product is a power of two in "
                 f"{BLOCK_SIZES[0]}..{BLOCK_SIZES[-1]}, e.g. {_balanced(layout, DEFAULT_BLOCK)}")
    return tuple(int(b) for b in box)


def _nested(bq: tuple[int, ...], bk: tuple[int, ...]) -> bool:
    return all(b % a == 0 for a, b in zip(bq, bk)) or all(a % b == 0 for a, b in zip(bq, bk))


def _dilation(pattern: Pattern) -> tuple[int, ...]:
    """Per-axis dilation grouping: the neighborhoods' dilation where they all agree."""
    rank = pattern.layout.rank
    seen: list[set[int]] = [set() for _ in range(rank)]
    for _, _, e in pattern.exprs():
        for node in e.walk():
            if isinstance(node, Neighborhood):
                for a in range(rank):
                    seen[a].add(node.dilation[a])
    return tuple(next(iter(s)) if len(s) == 1 else 1 for s in seen)


def _candidate_boxes(layout: Layout, dil: tuple[int, ...], volume: int) -> list[tuple[int, ...]]:
    """Power-of-two boxes of ``volume`` tokens, least padding first, at most 12."""
    lens = [-(-L // d) for L, d in zip(layout.sizes, dil)]
    exps = range(int(math.log2(volume)) + 1)
    boxes = [tuple(1 << e for e in c) for c in itertools.product(exps, repeat=layout.rank)
             if sum(c) == math.log2(volume)]

    def waste(b):
        return (math.prod(-(-g // x) * x for g, x in zip(lens, b)), max(b) / min(b))
    return sorted(boxes, key=waste)[:12]


def _balanced(layout: Layout, volume: int) -> tuple[int, ...]:
    return _candidate_boxes(layout, (1,) * layout.rank, volume)[0]


def _block_sparse_box(pattern: Pattern) -> tuple[int, ...] | None:
    """A box whose tiles are never partial for the pattern's neighborhood, if there is one.

    A neighborhood with stride == window dividing every axis is blocked attention: tiles equal
    to the window are exactly its blocks (when the window is a valid box). More generally
    (STA, sliding tile attention: window a multiple of the stride), the queries of a stride
    group share one window, which starts on a multiple of the stride or at ``L - window``; a
    box whose extents divide the stride, the window, ``L - window`` and ``L`` on every axis keeps
    every query tile inside one group and every window edge on a tile edge.
    """
    for _, _, e in pattern.exprs():
        for node in e.walk():
            if not isinstance(node, Neighborhood) or any(node.causal):
                continue
            sizes = pattern.layout.sizes
            if node.stride == node.window and math.prod(node.window) in BLOCK_SIZES and \
                    all((L // d) % K == 0 and L % d == 0 for L, K, d in zip(sizes, node.window, node.dilation)):
                return node.window
            if any(d != 1 for d in node.dilation) or all(s == 1 for s in node.stride):
                continue
            most = [math.gcd(s, K, L - K, L) if K <= L else math.gcd(s, L) for s, K, L in zip(node.stride, node.window, sizes)]
            box = [m & -m for m in most]  # the largest power of two dividing each
            while math.prod(box) > DEFAULT_BLOCK:
                a = max(range(len(box)), key=lambda i: (box[i], i))
                box[a] //= 2
            if math.prod(box) in BLOCK_SIZES:
                return tuple(box)
    return None


def _grow(box: tuple[int, ...], volume: int, layout: Layout) -> tuple[int, ...]:
    """Double the roomiest axis of ``box`` until it holds ``volume`` tokens (nested boxes)."""
    box = list(box)
    while math.prod(box) < volume:
        a = max(range(len(box)), key=lambda i: (layout.sizes[i] / box[i], i))
        box[a] *= 2
    return tuple(box)


def make_plan(pattern: Pattern, *, inputs: Mapping[str, np.ndarray] | None = None,
              block_m: int | None = None, block_n: int | None = None,
              order: str | None = None, content: Mapping[Any, np.ndarray] | None = None) -> Plan:
    """Plan a pattern: tile sizes, token order and the exact tile tables of every head group.

    ``content`` is one batch item's routing decisions for patterns with ``route``
    (:func:`attnlang.routing.pattern_content`); such plans have one head group per query head.

    Explicit arguments override ``pattern.schedule``, which overrides the planner's choice.
    ``inputs`` are one batch item's runtime inputs (``ids [N]`` for ``same``, a 0-d length for
    ``valid``). Work grows with the visited tiles, never with N²:

    >>> from attnlang import Pattern, neighborhood
    >>> p = Pattern.create(neighborhood(window=(8, 8), stride=(8, 8)), tokens=(32, 32))
    >>> s = make_plan(p).stats()
    >>> s["tile_bound"] == s["flop_bound"]
    True
    """
    layout = pattern.layout
    got = check_inputs(pattern, inputs)
    if pattern.reads_content and not isinstance(pattern.attend, Pyramid):
        return _plan_routed(pattern, got, content, block_m, block_n, order)
    if isinstance(pattern.attend, Pyramid):  # (query tile, key block, level) from the content
        bm = _check_block("block_m", block_m or DEFAULT_BLOCK)
        return pyramid_plan(pattern, content, bm, _check_block("block_n", block_n or bm))
    sched = pattern.schedule
    order = order if order is not None else sched.order
    if order is not None and order not in ORDERS:
        raise AttnError(f"unknown order {order!r}", hint=f"valid orders: {', '.join(ORDERS)}")
    box_q = sched.tile_q if sched.tile_q is not None and len(sched.tile_q) == layout.rank else None
    box_kv = sched.tile_kv if sched.tile_kv is not None and len(sched.tile_kv) == layout.rank else None
    if layout.rank == 1:
        box_q = box_kv = None  # a 1-D "box" is a tile size
    flat_m = sched.tile_q[0] if sched.tile_q is not None and box_q is None else None
    flat_n = sched.tile_kv[0] if sched.tile_kv is not None and box_kv is None else None
    bm = block_m if block_m is not None else flat_m
    bn = block_n if block_n is not None else flat_n
    if block_m is not None:
        box_q = None if box_q is None or math.prod(box_q) != block_m else box_q
    if block_n is not None:
        box_kv = None if box_kv is None or math.prod(box_kv) != block_n else box_kv
    if box_q is not None:
        box_q = _check_box("q", box_q, layout)
        bm = math.prod(box_q)
    if box_kv is not None:
        box_kv = _check_box("kv", box_kv, layout)
        bn = math.prod(box_kv)
    if bm is None and bn is None:
        bm = bn = DEFAULT_BLOCK
    bm = _check_block("block_m", bm if bm is not None else bn)
    bn = _check_block("block_n", bn if bn is not None else bm)
    if order is None:
        order = "natural" if layout.rank == 1 or (box_q is None and box_kv is None and
                                                  (sched.tile_q or sched.tile_kv)) else "tiled"

    notes: list[str] = []
    if order == "natural":
        ordering = Ordering.natural(layout)
        notes.append("natural order: tiles are flat index ranges" +
                     ("" if layout.rank == 1 else " (row strips of the grid)"))
        return _finish(pattern, ordering, bm, bn, got, notes)

    dil = _dilation(pattern)
    if any(d > 1 for d in dil):
        notes.append(f"dilation groups made contiguous per axis (dilation {dil}): a dilated "
                     "neighborhood becomes a dense one inside each group")
    if box_q is not None and box_kv is None:
        box_kv = box_q if bn == bm else None
    if box_kv is not None and box_q is None:
        box_q = box_kv if bn == bm else None
    searched = None  # the box search's tables of the box it picks
    if box_q is None or box_kv is None:
        fixed = box_q or box_kv
        cands = []
        if fixed is not None:
            other = bn if box_kv is None else bm
            cands = [(box_q or b, box_kv or b) for b in _candidate_boxes(layout, dil, other)
                     if _nested(fixed, b)] or [(box_q or _grow(fixed, other, layout),
                                                box_kv or _grow(fixed, other, layout))]
        else:
            small = min(bm, bn)
            sizes = _candidate_boxes(layout, dil, small)
            sparse = _block_sparse_box(pattern)
            if sparse is not None and block_m is None and block_n is None and sched.tile_q is None:
                sizes = [tuple(sparse)] + [b for b in sizes if b != tuple(sparse)]
            for b in sizes:
                vol_q, vol_k = (bm, bn) if math.prod(b) == small else (math.prod(b),) * 2
                g = _grow(b, max(vol_q, vol_k), layout)
                cands.append((b if vol_q <= vol_k else g, b if vol_k <= vol_q else g))
        best, tried, spent = None, 0, 0
        for bq, bk in cands:
            score, tables = _box_cost(pattern, Ordering.boxed(layout, bq, bk, dil), math.prod(bq), math.prod(bk), got)
            tried, spent = tried + 1, spent + score[0] // (math.prod(bq) * math.prod(bk))
            if best is None or score < best[0]:
                best, searched = (score, bq, bk), tables
            if spent > SEARCH_BUDGET_TILES:  # dense-ish patterns: every box costs about the same
                break
        _, box_q, box_kv = best
        notes.append(f"tile boxes q {box_q}, kv {box_kv}: fewest visited token pairs "
                     + (f"({best[0][0]}) among {len(cands)} candidate boxes" if tried == len(cands) else
                        f"({best[0][0]}) among the first {tried} of {len(cands)} candidate boxes "
                        "(search budget reached)"))
    elif not _nested(box_q, box_kv):
        raise AttnError(f"schedule tile q = {box_q} and kv = {box_kv} do not nest",
                        hint="one box must divide the other on every axis, e.g. q = kv")
    bm, bn = math.prod(box_q), math.prod(box_kv)
    seq = None
    if order != "tiled":
        searched = None  # the search classified the tiled order; other orders are other tiles
    if order == "rcm":
        base = Ordering.boxed(layout, box_q, box_kv, dil)
        p = _finish(pattern, base, bm, bn, got, [])
        seq = _rcm_sequence(base, p)
        notes.append("rcm: boxes relabelled by reverse Cuthill-McKee on the tile graph")
    ordering = Ordering.boxed(layout, box_q, box_kv, dil, order, seq)
    notes.append(f"{order} order of boxes; each axis padded to whole boxes "
                 f"({ordering.n_kernel - layout.n} padding positions)")
    return _finish(pattern, ordering, bm, bn, got, notes, searched)


# Visited tiles the box search may classify in total before it settles for the best so far.
SEARCH_BUDGET_TILES = 2_000_000


def _box_cost(pattern: Pattern, ordering: Ordering, bm: int, bn: int, inputs) -> tuple[tuple[int, int, int], list]:
    """(visited token pairs, partial token pairs, kernel length) of a candidate tiling, and its
    tables per head group (the finished plan reuses the winner's instead of planning again)."""
    check_rows(ordering.n_kernel, bm, bn)
    ctx = Ctx(pattern.layout, ordering, ordering.tiles("q", bm), ordering.tiles("kv", bn), inputs)
    visited = partial = 0
    tables = []
    for _, _, e in pattern.exprs():
        tables.append(plan_group(e, ctx))
        visited += tables[-1][0].nnz + tables[-1][1].nnz
        partial += tables[-1][0].nnz
    return (visited * bm * bn, partial * bm * bn, ordering.n_kernel), tables


def _plan_routed(pattern: Pattern, inputs, content, block_m: int | None, block_n: int | None,
                 order: str | None) -> Plan:
    """Plan a pattern with ``route`` for one batch item: one head group per query head, route
    terms classified from that head's selection, static terms by their exact rules."""
    if not content:
        raise AttnError(f"pattern '{pattern.name}' reads Q/K content (route): it is planned per call",
                        hint="call attnlang.compile(...)(q, k, v), or pass "
                             "content=attnlang.routing.pattern_content(pattern, q, k) to make_plan")
    layout, sched = pattern.layout, pattern.schedule
    flat = lambda t: t[0] if t is not None and len(t) == 1 else None  # noqa: E731
    bm = block_m or flat(sched.tile_q) or block_n or flat(sched.tile_kv) or DEFAULT_BLOCK
    bm = _check_block("block_m", bm)
    bn = _check_block("block_n", block_n or flat(sched.tile_kv) or bm)
    notes = ["routed: planned at call time from this batch item's Q/K selection, one head group per "
             "query head, natural order"]
    if (order or sched.order) not in (None, "natural") or (layout.rank > 1 and (sched.tile_q or sched.tile_kv)):
        notes.append("routed plans run in natural order with flat tiles; the schedule's boxes/order are "
                     "not applied to them yet")
    ordering = Ordering.natural(layout)
    check_rows(layout.n, bm, bn)
    Q, K = ordering.tiles("q", bm), ordering.tiles("kv", bn)
    heads = next(np.asarray(v).shape[0] for key, v in content.items() if isinstance(key, Route))
    groups, checked = [], 0
    for h in range(heads):
        ctx = Ctx(layout, ordering, Q, K, inputs, content=content, head=h)
        part, full, n_el = plan_group(pattern.expr_for_head(h), ctx)
        checked += n_el
        groups.append(HeadGroup.of(h, h + 1, part, full))
    if checked:
        notes.append(f"{checked} tile pair(s) undecidable by the rules were checked per element")
    return Plan(pattern, bm, bn, (bm,), (bn,), None, tuple(groups), tuple(notes), None)


def _rcm_sequence(base: Ordering, plan: Plan) -> np.ndarray:
    """Big-box sequence from reverse Cuthill-McKee on boxes that attend to each other."""
    per_big_q = math.prod(base.big) // plan.block_m
    per_big_k = math.prod(base.big) // plan.block_n
    edges = []
    for g in plan.groups:
        for table in (g.partial, g.full):
            rows = np.repeat(np.arange(table.rows), table.counts())
            edges.append(np.stack([rows // per_big_q, table.indices // per_big_k], 1))
    perm = rcm_order(len(base.seq), np.unique(np.concatenate(edges), axis=0))
    return base.seq[perm]


def _finish(pattern: Pattern, ordering: Ordering, bm: int, bn: int, inputs, notes: list[str],
            searched: list | None = None) -> Plan:
    """The plan on ``ordering``; ``searched`` are its tables when the box search made them."""
    layout = pattern.layout
    check_rows(ordering.n_kernel, bm, bn)
    ctx = Ctx(layout, ordering, ordering.tiles("q", bm), ordering.tiles("kv", bn), inputs)
    groups, pairs = [], []
    checked = 0
    for i, (lo, hi, e) in enumerate(pattern.exprs()):
        part, full, n_el = searched[i] if searched is not None else plan_group(e, ctx)
        checked += n_el
        term = lower(e, layout)
        analytic = (functools.partial(analytic_ranges, term, layout, ordering, bm, bn, part, full)
                    if layout.rank == 1 and ordering.is_natural and band_blocks(term) is not None else None)
        by_head = not isinstance(pattern.attend, Expr)
        groups.append(HeadGroup.of(lo, hi if by_head else None, part, full, analytic))
        pairs.append(allowed_pairs(term, layout, inputs))
    if checked:
        notes = notes + [f"{checked} tile pair(s) undecidable by the rules were checked per element"]
    if any(g.closed_form is not None for g in groups):
        notes = notes + ["analytic: closed-form key-tile ranges per query tile (codegen loop bounds, "
                         "derived on first use)"]
    allowed = tuple(pairs) if all(p is not None for p in pairs) else None
    return Plan(pattern, bm, bn, ordering.box_q or (bm,), ordering.box_kv or (bn,),
                ordering.positions(), tuple(groups), tuple(notes), allowed)


__all__ = ["make_plan", "lower", "Term", "Axes", "plan_group", "DEFAULT_BLOCK", "BLOCK_SIZES"]
