"""Pass 4, classify: EMPTY / PARTIAL / FULL of every candidate tile pair, exact per primitive,
three-valued logic across terms, a per-element check of the rare undecided candidates only;
:func:`plan_group` runs passes 3-4 for one head group and returns its CSR tables.
"""
from __future__ import annotations

import functools

import numpy as np

from attnlang.passes.candidates import region
from attnlang.passes.closed_forms import interval_tables
from attnlang.passes.joins import join_pairs, route_join_pairs, token_counts
from attnlang.passes.lower import Op, Term, lower
from attnlang.passes.tiles import Ctx, check_pairs
from attnlang.pattern import And, Env, Expr, Not, Or, Points, Random
from attnlang.plan import BlockTable
from attnlang.tiling import (
    EMPTY, FULL, PARTIAL, UNKNOWN, and3, axis_class, band_class, not3, or3, union_class,
)


CHUNK = 1 << 20  # candidate pairs classified at once
ELEMENTS = 1 << 22  # token pairs evaluated at once by the per-element check


# --------------------------------------------------------------------------------------------
# classify: exact classes of candidate tile pairs
# --------------------------------------------------------------------------------------------

def classify(t: Term, ctx: Ctx, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """Class of each (qt, kt) pair under term ``t``; UNKNOWN where the rules cannot decide."""
    n = len(qt)
    if t.op == Op.FULL:
        return np.full(n, FULL, dtype=np.int8)
    if t.op == Op.NONE:
        return np.full(n, EMPTY, dtype=np.int8)
    if t.op == Op.NOT:
        return not3(classify(t.items[0], ctx, qt, kt))
    if t.op in (Op.AND, Op.OR):
        cs = [classify(i, ctx, qt, kt) for i in t.items]
        return and3(cs) if t.op == Op.AND else or3(cs)
    if t.op in (Op.RANDOM, Op.SAME, Op.ROUTE):
        keys, cls = join_pairs(t, ctx) if t.op != Op.ROUTE else route_join_pairs(t, ctx)
        want = qt * ctx.nk + kt
        if not len(keys):
            return np.full(n, EMPTY, dtype=np.int8)
        i = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        return np.where(keys[i] == want, cls[i], EMPTY).astype(np.int8)
    if t.op in (Op.KEYS, Op.QUERIES, Op.VALID):
        cq, ck = token_counts(t, ctx)
        a, b = cq[qt], ck[kt]
        full = (a == ctx.Q.nvalid[qt]) & (b == ctx.K.nvalid[kt])
        return np.where((a == 0) | (b == 0), EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)
    # Piece-level terms: [n, Pq, 1] x [n, 1, Pk], then the union over pieces.
    valid = ctx.Q.pvalid[qt][:, :, None] & ctx.K.pvalid[kt][:, None, :]
    if t.op == Op.BAND:
        _, _, qf0, qf1, qc = ctx.coords("q")
        _, _, kf0, kf1, kc = ctx.coords("kv")
        c = band_class(t.arg, qf0[qt][:, :, None], qf1[qt][:, :, None], qc[qt][:, :, None],
                       kf0[kt][:, None, :], kf1[kt][:, None, :], kc[kt][:, None, :])
        return union_class(c, valid, (1, 2))
    per_axis = []
    Q, K = ctx.Q, ctx.K
    qg = qlo = qhi = kg = klo = khi = None
    for a, preds in enumerate(t.arg.preds):
        (uq, iq), (uk, ik) = ctx.axis_ids("q", a), ctx.axis_ids("kv", a)
        if preds and len(uq) * len(uk) <= min(AXIS_TABLE, 4 * n + 4096):  # pays off
            # A 1-D class depends only on the two intervals on this axis: table it once.
            key = ("axis_class", preds, a)
            if key not in ctx._cache:
                ctx._cache[key] = axis_class(preds, uq[:, None, 0], uq[:, None, 1], uq[:, None, 2],
                                             uk[None, :, 0], uk[None, :, 1], uk[None, :, 2], ctx.ordering.dil[a])
            per_axis.append(ctx._cache[key][iq[qt][:, :, None], ik[kt][:, None, :]])
        elif preds:
            if qg is None:  # gathered once, for the axes without a table
                qg, qlo, qhi, kg, klo, khi = Q.g[qt], Q.lo[qt], Q.hi[qt], K.g[kt], K.lo[kt], K.hi[kt]
            per_axis.append(axis_class(
                preds, qg[:, :, None, a], qlo[:, :, None, a], qhi[:, :, None, a],
                kg[:, None, :, a], klo[:, None, :, a], khi[:, None, :, a], ctx.ordering.dil[a]))
    if not per_axis:
        return np.full(n, FULL, dtype=np.int8)
    # EMPTY < PARTIAL < FULL and axis classes are decided: a product is the smallest of them.
    return union_class(np.minimum.reduce(per_axis), valid, (1, 2))


MAX_PRODUCT_LEAVES = 4  # per-axis signatures take 2^leaves values
AXIS_TABLE = 1 << 22  # largest per-axis table (distinct query x key intervals) worth building


def _product_leaves(t: Term) -> list[Term] | None:
    """The per-axis (``axes``) leaves of a boolean combination of per-axis primitives, or None
    when the term has other leaves (bands, token sets, joins) or too many of them."""
    leaves: list[Term] = []

    def walk(u: Term) -> bool:
        if u.op == Op.AXES:
            if not any(u is x for x in leaves):
                leaves.append(u)
            return True
        if u.op in (Op.FULL, Op.NONE):
            return True
        return u.op in (Op.AND, Op.OR, Op.NOT) and all(walk(i) for i in u.items)
    return leaves if walk(t) and 0 < len(leaves) <= MAX_PRODUCT_LEAVES else None


def _truth(t: Term, leaves: list[Term], m: np.ndarray) -> np.ndarray:
    """The term's value for each leaf assignment ``m`` (bit i = leaf i holds)."""
    if t.op == Op.AXES:
        return (m >> next(i for i, x in enumerate(leaves) if x is t)) & 1 == 1
    if t.op in (Op.FULL, Op.NONE):
        return np.full(m.shape, t.op == Op.FULL)
    vals = [_truth(i, leaves, m) for i in t.items]
    if t.op == Op.NOT:
        return ~vals[0]
    return np.logical_and.reduce(vals) if t.op == Op.AND else np.logical_or.reduce(vals)


def _product_classes(t: Term, ctx: Ctx, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """Exact classes of tile pairs under a boolean combination of per-axis primitives (unions
    and differences of neighborhoods, blocks, ...), decided per axis instead of per token pair.

    Every leaf is a product over axes, so a (query, key) pair's leaf values are the bitwise AND
    over axes of per-axis *signatures* (bit i: leaf i's 1-D predicates hold on that axis). Per
    axis, the set of signatures a tile pair shows depends only on the two tiles' intervals on
    that axis: one small table per axis (distinct query intervals x distinct key intervals,
    ``extent_q x extent_k`` coordinate checks each). Per pair, the sets of leaf assignments are
    then combined axis by axis (AND of signatures), and the tile is FULL iff the term holds on
    every present assignment, EMPTY iff on none. Tiles are one box each (the caller checks).
    """
    leaves = _product_leaves(t)
    V = 1 << len(leaves)
    truth = _truth(t, leaves, np.arange(V))
    masks = None
    for a in range(ctx.layout.rank):
        (uq, iq), (uk, ik) = ctx.axis_ids("q", a), ctx.axis_ids("kv", a)
        key = ("signatures", tuple(leaf.arg.preds[a] for leaf in leaves), a)
        if key not in ctx._cache:
            qi, ki = np.divmod(np.arange(len(uq) * len(uk), dtype=np.int64), len(uk))
            ctx._cache[key] = _signature_masks(leaves, a, uq[qi], uk[ki], ctx.ordering.dil[a], V).reshape(len(uq), len(uk))
        m = ctx._cache[key][iq[qt, 0], ik[kt, 0]]
        masks = m if masks is None else _and_masks(masks, m, V)
    holds = np.zeros(len(qt), dtype=bool)
    fails = np.zeros(len(qt), dtype=bool)
    for v in range(V):  # assignment v is present in the pair when bit v of the mask is set
        present = (masks >> v) & 1 == 1
        if truth[v]:
            holds |= present
        else:
            fails |= present
    return np.where(~holds, EMPTY, np.where(~fails, FULL, PARTIAL)).astype(np.int8)


def _signature_masks(leaves: list[Term], a: int, q: np.ndarray, k: np.ndarray, dil: int, V: int) -> np.ndarray:
    """Per (query interval, key interval) pair on axis ``a`` (rows ``(g, lo, hi)``), the set of
    leaf signatures its coordinate pairs show, as a ``V``-bit mask."""
    eq, ek = int((q[:, 2] - q[:, 1]).max(initial=0)) + 1, int((k[:, 2] - k[:, 1]).max(initial=0)) + 1
    out = np.zeros(len(q), dtype=np.int64)
    step = max(1, ELEMENTS // (eq * ek * len(leaves)))
    for s in range(0, len(q), step):
        q_, k_ = q[s:s + step], k[s:s + step]
        n = len(q_)
        # Clamped duplicates repeat real coordinates, so the sets stay exact.
        qc = q_[:, 0, None] + dil * np.minimum(q_[:, 1, None] + np.arange(eq), q_[:, 2, None])
        kc = k_[:, 0, None] + dil * np.minimum(k_[:, 1, None] + np.arange(ek), k_[:, 2, None])
        sig = np.zeros((n, eq, ek), dtype=np.int64)
        for i, leaf in enumerate(leaves):
            ok = np.ones((n, eq, ek), dtype=bool)
            for p in leaf.arg.preds[a]:
                ok &= p.allowed(qc[:, :, None], kc[:, None, :])
            sig |= ok.astype(np.int64) << i
        pres = np.zeros((n, V), dtype=bool)
        pres[np.repeat(np.arange(n), eq * ek), sig.reshape(-1)] = True
        out[s:s + step] = (pres.astype(np.int64) << np.arange(V)).sum(1)
    return out


@functools.lru_cache(maxsize=4)
def _and_table(V: int) -> np.ndarray:
    """``T[m1, m2]``: the assignments ``i & j`` over ``i`` in ``m1`` and ``j`` in ``m2`` (masks)."""
    m = np.arange(1 << V, dtype=np.int64)
    out = np.zeros((1 << V, 1 << V), dtype=np.int64)
    for i in range(V):
        for j in range(V):
            out |= ((((m[:, None] >> i) & 1) & ((m[None, :] >> j) & 1)) << (i & j))
    return out


def _and_masks(m1: np.ndarray, m2: np.ndarray, V: int) -> np.ndarray:
    """Pairwise AND of two sets of leaf assignments (``V``-bit masks), per tile pair."""
    if V <= 8:
        return _and_table(V)[m1, m2]
    out = np.zeros_like(m1)
    for i in range(V):
        hi = (m1 >> i) & 1
        for j in range(V):
            out |= (hi & ((m2 >> j) & 1)) << (i & j)
    return out


def _allowed(e: Expr, q: Points, k: Points, env: Env, tables: dict) -> np.ndarray:
    """The IR's own ``allowed``, with Random's drawn table computed once per plan."""
    if isinstance(e, And):
        out = _allowed(e.items[0], q, k, env, tables)
        for i in e.items[1:]:
            out = out & _allowed(i, q, k, env, tables)
        return out
    if isinstance(e, Or):
        out = _allowed(e.items[0], q, k, env, tables)
        for i in e.items[1:]:
            out = out | _allowed(i, q, k, env, tables)
        return out
    if isinstance(e, Not):
        return ~_allowed(e.item, q, k, env, tables)
    if isinstance(e, Random):
        t = tables.setdefault(("table", id(e)), e.table(env.layout))
        return t[q.flat // e.block, k.flat // e.block]
    return e.allowed(q, k, env)


def _elementwise(e: Expr, ctx: Ctx, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """Exact classes of a few tile pairs by evaluating the predicate on their tokens."""
    bm, bn = ctx.Q.block, ctx.K.block
    out = np.empty(len(qt), dtype=np.int8)
    env = Env(ctx.layout, ctx.inputs, ctx.head, ctx.content)
    step = max(1, ELEMENTS // (bm * bn))
    for s in range(0, len(qt), step):
        tq = ctx.ordering.tokens_at(qt[s:s + step, None] * bm + np.arange(bm))
        tk = ctx.ordering.tokens_at(kt[s:s + step, None] * bn + np.arange(bn))
        ok = _allowed(e, ctx.layout.points(np.maximum(tq, 0)[:, :, None]),
                      ctx.layout.points(np.maximum(tk, 0)[:, None, :]), env, ctx._cache)
        ok = np.broadcast_to(ok, (len(tq), bm, bn))
        v = (tq >= 0)[:, :, None] & (tk >= 0)[:, None, :]
        out[s:s + step] = np.where((ok | ~v).all((1, 2)), FULL,
                                   np.where((ok & v).any((1, 2)), PARTIAL, EMPTY))
    return out


def plan_group(e: Expr, ctx: Ctx) -> tuple[BlockTable, BlockTable, int]:
    """Partial and full tables of one head group; also how many pairs needed element checks."""
    t = lower(e, ctx.layout)
    tables = interval_tables(t, ctx)
    if tables is not None:
        return tables[0], tables[1], 0
    # Sorted by (qt, kt) for the CSR tables; sort-and-drop-repeats beats np.unique's hashing here.
    reg = region(t, ctx)
    check_pairs(reg.count(), ctx)
    keys = np.sort(reg.expand(ctx))
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys
    qt, kt = np.divmod(keys, ctx.nk)
    keep = (ctx.Q.nvalid[qt] > 0) & (ctx.K.nvalid[kt] > 0)
    qt, kt = qt[keep], kt[keep]
    cls = np.empty(len(qt), dtype=np.int8)
    product = _product_leaves(t) is not None and ctx.Q.g.shape[1] == 1 and ctx.K.g.shape[1] == 1 and \
        all(len(ctx.axis_ids("q", a)[0]) * len(ctx.axis_ids("kv", a)[0]) <= min(AXIS_TABLE, 4 * len(qt) + 4096)
            for a in range(ctx.layout.rank))
    for s in range(0, len(qt), CHUNK):
        # Boolean combinations of per-axis primitives on box tiles: exact per-axis tables decide
        # every class at once; otherwise three-valued rules, then the rare undecided per element.
        cls[s:s + CHUNK] = (_product_classes if product else classify)(t, ctx, qt[s:s + CHUNK], kt[s:s + CHUNK])
    todo = np.nonzero(cls == UNKNOWN)[0]
    if len(todo):
        cls[todo] = _elementwise(e, ctx, qt[todo], kt[todo])
    # Padding or a ragged tail makes a tile partial: the kernel must mask those positions.
    cls[(cls == FULL) & ~(ctx.Q.complete[qt] & ctx.K.complete[kt])] = PARTIAL
    part, full = cls == PARTIAL, cls == FULL
    return (_csr(qt[part], kt[part], ctx.nq, ctx.nk), _csr(qt[full], kt[full], ctx.nq, ctx.nk), len(todo))


def _csr(qt: np.ndarray, kt: np.ndarray, rows: int, cols: int) -> BlockTable:
    """CSR from pairs already sorted by (qt, kt)."""
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(qt, minlength=rows), out=indptr[1:])
    return BlockTable(indptr, kt.astype(np.int32), cols)
