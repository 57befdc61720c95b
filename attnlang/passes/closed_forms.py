"""Pass 5 (1-D bands): closed forms of a plan — analytic tile ranges (derived with sympy in
attnlang.closed_form, the one module that holds sympy) checked against the
tables, and allowed-pair counts without the N x N mask.
"""
from __future__ import annotations

import numpy as np

from attnlang.order import Ordering
from attnlang.passes.lower import Op, Term
from attnlang.passes.tiles import Ctx, input_length
from attnlang.pattern import INF, Layout, Range
from attnlang.plan import BlockTable, TileRange
from attnlang.tiling import AxisKind, Band


# --------------------------------------------------------------------------------------------
# Closed forms: analytic tile ranges and allowed pair counts
# --------------------------------------------------------------------------------------------

def band_blocks(term: Term) -> tuple[Band, list[tuple[int, int]]] | None:
    """A 1-D conjunction of bands and blocks as (band, [(size, shift)]), else None."""
    items = term.items if term.op == Op.AND else (term,)
    band, blocks = Band(-INF, INF), []
    for t in items:
        if t.op == Op.BAND:
            band = band & t.arg
        elif t.op == Op.AXES and all(p.kind == AxisKind.BLOCK for p in t.arg.preds[0]):
            blocks += [p.args for p in t.arg.preds[0]]
        elif t.op != Op.FULL:
            return None
    return band, blocks


def analytic_ranges(term: Term, layout: Layout, ordering: Ordering, bm: int, bn: int,
              part: BlockTable, full: BlockTable) -> TileRange | None:
    """Closed-form key-tile ranges (sympy, in the symbol ``qt``) for 1-D bands and blocks,
    kept only when they reproduce the tables exactly."""
    if layout.rank != 1 or not ordering.is_natural:
        return None
    bb = band_blocks(term)
    if bb is None:
        return None
    from attnlang.closed_form import band_tile_range  # function-level: sympy, only when a plan asks

    band, blocks = bb
    tr, funcs = band_tile_range(band.lo, band.hi, tuple(blocks), layout.n, bm, bn)
    return tr if _tilerange_matches(funcs, part, full) else None


def _tilerange_matches(funcs, part: BlockTable, full: BlockTable) -> bool:
    """Whether the closed forms reproduce the tables row by row (they are kept only then)."""
    rows = part.rows
    x = np.arange(rows, dtype=np.int64)
    vals = [np.broadcast_to(np.asarray(f(x)), (rows,)).astype(np.int64) for f in funcs]
    lo, hi, flo, fhi = vals
    fhi = np.maximum(fhi, flo)
    visited = np.maximum(hi - lo, 0)
    if not np.array_equal(visited, part.counts() + full.counts()):
        return False
    if not np.array_equal(fhi - flo, full.counts()):
        return False
    # Rows are contiguous ranges: check where each row starts (O(rows) on range tables).
    pf, ff = part.first(), full.first()
    start = np.where(pf < 0, ff, np.where(ff < 0, pf, np.minimum(pf, ff)))
    has = visited > 0
    ok = np.array_equal(start[has], lo[has])
    hasf = full.counts() > 0
    return ok and np.array_equal(ff[hasf], flo[hasf])


def _row_intervals(term: Term, layout: Layout, inputs, q: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per query (flat index ``q``, default all), the allowed keys as one interval ``[lo, hi]``
    (empty where ``lo > hi``), when they are one; else None. O(len(q))."""
    n = layout.n
    q = np.arange(n, dtype=np.int64) if q is None else q
    lo, hi = np.zeros(len(q), dtype=np.int64), np.full(len(q), n - 1, dtype=np.int64)
    items = term.items if term.op == Op.AND else (term,)
    for t in items:
        if t.op == Op.NOT:
            continue  # subtracted below, once the positive terms bound the interval
        if t.op == Op.BAND:
            if t.arg.lo != -INF:
                lo = np.maximum(lo, q + int(max(t.arg.lo, -n)))
            if t.arg.hi != INF:
                hi = np.minimum(hi, q + int(min(t.arg.hi, n)))
        elif t.op == Op.AXES and layout.rank == 1:
            for p in t.arg.preds[0]:
                if p.kind == AxisKind.STRIDED or (p.kind == AxisKind.NBHD and p.args[1] > 1):
                    return None
                plo, phi = p.reach(q, q)
                lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
        elif t.op == Op.VALID:
            m = input_length(inputs, t.arg.input)
            hi = np.where(q < m, np.minimum(hi, m - 1), -1)
        elif t.op in (Op.KEYS, Op.QUERIES) and isinstance(t.arg.sel, Range):
            r = t.arg.sel
            if t.op == Op.KEYS:
                lo, hi = np.maximum(lo, r.lo), np.minimum(hi, r.hi - 1)
            else:
                hi = np.where((q >= r.lo) & (q < r.hi), hi, -1)
        elif t.op == Op.NONE:
            hi = np.full(len(q), -1, dtype=np.int64)
        elif t.op != Op.FULL:
            return None
    for t in items:
        if t.op != Op.NOT:
            continue
        # lo..hi minus an interval x..y is an interval when at most one side remains (e.g.
        # causal - block(512): the keys before the query's block).
        inner = _row_intervals(t.items[0], layout, inputs, q)
        if inner is None:
            return None
        x, y = inner
        cut = x <= y
        below_hi, above_lo = np.minimum(hi, x - 1), np.maximum(lo, y + 1)
        below, above = cut & (lo <= below_hi), cut & (above_lo <= hi)
        if np.any(below & above):
            return None
        lo = np.where(above, above_lo, lo)
        hi = np.where(below, below_hi, np.where(cut & ~above, -1, hi))
    return lo, hi


# Queries whose key intervals are computed at once by the interval planner (bounds its memory).
INTERVAL_CHUNK = 1 << 18


def interval_tables(term: Term, ctx: Ctx) -> tuple[BlockTable, BlockTable] | None:
    """Range tables of a natural-order plan whose query rows are key intervals (bands, blocks,
    windows, ``valid``, key/query ranges and their conjunctions); None when they are not.

    Every row is then one range of visited key tiles with one range of full ones inside it,
    exact: a key tile is FULL iff every query of the (complete) query tile allows all of its
    (complete) keys, i.e. it lies in ``[max lo, min hi]``; it is visited iff some query's
    interval meets it, which is the range ``[min lo, max hi]`` when the queries' tile intervals
    chain without gaps (checked; otherwise None and the general path decides). O(N) time,
    O(query tiles) memory: a causal plan at N = 2^20 stores 16k rows, not 134M tiles.
    """
    if not ctx.ordering.is_natural or term.op == Op.OR:
        return None
    layout, n, bm, bn = ctx.layout, ctx.layout.n, ctx.Q.block, ctx.K.block
    if _row_intervals(term, layout, ctx.inputs, np.zeros(1, dtype=np.int64)) is None:
        return None
    nq, nk = ctx.nq, ctx.nk
    vlo, vhi = np.zeros(nq, dtype=np.int64), np.zeros(nq, dtype=np.int64)
    flo, fhi = np.zeros(nq, dtype=np.int64), np.zeros(nq, dtype=np.int64)
    step = max(1, INTERVAL_CHUNK // bm)
    for t0 in range(0, nq, step):
        t1 = min(nq, t0 + step)
        q = np.arange(t0 * bm, t1 * bm, dtype=np.int64)
        iv = _row_intervals(term, layout, ctx.inputs, np.minimum(q, n - 1))
        if iv is None:  # some query's keys are two intervals (a difference of bands)
            return None
        a, b = iv
        ok = (a <= b) & (q < n)
        a, b, ok = a.reshape(-1, bm), b.reshape(-1, bm), ok.reshape(-1, bm)
        big = np.iinfo(np.int64).max
        # Tile intervals of the queries, in query order, must chain: each starts no later than
        # one past the furthest tile reached so far, and starts never move back.
        ta, tb = np.where(ok, a // bn, big), np.where(ok, b // bn, -1)
        reach = np.maximum.accumulate(tb, axis=1)
        prev = np.concatenate([np.full((len(tb), 1), -1), reach[:, :-1]], axis=1)
        start_max = np.maximum.accumulate(np.where(ok, ta, -1), axis=1)
        first = np.concatenate([np.ones((len(tb), 1), bool), ~np.maximum.accumulate(ok, axis=1)[:, :-1]], axis=1)
        if not np.all(~ok | first | ((ta <= prev + 1) & (ta >= start_max))):
            return None
        any_ = ok.any(1)
        lo_t = np.where(ok, a, big).min(1) // bn
        hi_t = tb.max(1) + 1
        vlo[t0:t1], vhi[t0:t1] = np.where(any_, lo_t, 0), np.where(any_, hi_t, 0)
        # Full key tiles: inside every query's interval, complete, and the query tile complete.
        whole = ok.all(1)
        f0 = -(-np.where(whole, a.max(1), 0) // bn)
        f1 = np.minimum((np.where(whole, b.min(1), -1) + 1) // bn, n // bn)
        has = whole & (f1 > f0)
        flo[t0:t1], fhi[t0:t1] = np.where(has, f0, vhi[t0:t1]), np.where(has, f1, vhi[t0:t1])
    # Partial = visited minus full: below the full range, and above it.
    part = BlockTable.from_ranges(np.stack([vlo, fhi], 1), np.stack([flo, vhi], 1), nk)
    return part, BlockTable.from_ranges(flo, fhi, nk)


def allowed_pairs(term: Term, layout: Layout, inputs) -> int | None:
    """Exact allowed (q, k) pair count in closed form or O(N), else None."""
    n = layout.n
    if term.op == Op.FULL:
        return n * n
    if term.op == Op.NONE:
        return 0
    # Flat bands on any rank, per-axis primitives on 1-D layouts: one key interval per query.
    if _row_intervals(term, layout, inputs, np.zeros(1, dtype=np.int64)) is not None:
        total = 0
        for q0 in range(0, n, INTERVAL_CHUNK):
            iv = _row_intervals(term, layout, inputs, np.arange(q0, min(n, q0 + INTERVAL_CHUNK), dtype=np.int64))
            if iv is None:
                break
            total += int(np.maximum(iv[1] - iv[0] + 1, 0).sum())
        else:
            return total
    if term.op != Op.AXES:
        return None
    total = 1
    for a, preds in enumerate(term.arg.preds):
        L = layout.sizes[a]
        if not preds:
            total *= L * L
        elif L <= 2048:  # one axis, densely: L x L coordinates, not N x N tokens
            x = np.arange(L, dtype=np.int64)
            ok = np.ones((L, L), dtype=bool)
            for p in preds:
                ok &= p.allowed(x[:, None], x[None, :])
            total *= int(ok.sum())
        else:
            return None
    return total
