"""The planner: Pattern -> Plan without evaluating the N x N mask.

One pipeline of named passes::

    lower      Pattern IR -> planner terms: bands (causal/window merged), per-axis products,
               token-set leaves (keys/queries/valid), joins (random/same), and/or/not
    tiles      the ordering (natural or boxes) and both sides' tiles as sets of tokens
    candidates per query tile, the key tiles that may be non-empty (a superset, from each
               term's key reach) — never all key tiles unless the pattern needs them
    classify   EMPTY / PARTIAL / FULL of every candidate, exact per primitive, three-valued
               logic across terms, per-element check of the rare undecided candidates only
    tables     CSR tables per head group, their transposes, closed forms (sympy) for 1-D bands

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
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from attnlang.errors import AttnError
from attnlang.inputs import check_inputs
from attnlang.order import Ordering, TileSet, rcm_order
from attnlang.pattern import (
    INF, And, Causal, Empty, Env, Expr, Full, Indices, Keys, Layout, Neighborhood, Not, Or, Pattern,
    Points, Queries, Random, Range, Same, Valid, Window, ORDERS,
)
from attnlang.pattern import Pyramid, Route
from attnlang.plan import BlockTable, HeadGroup, Plan, TileRange
from attnlang.tiling import (
    EMPTY, FULL, PARTIAL, UNKNOWN, AxisPred, Band, and3, axis_class, band_class, factor, not3, or3,
    union_class,
)

DEFAULT_BLOCK = 64
BLOCK_SIZES = (16, 32, 64, 128, 256)
CHUNK = 1 << 20  # candidate pairs classified at once
ELEMENTS = 1 << 22  # token pairs evaluated at once by the per-element check
# Planning memory budget. A plan that would need more is refused with an AttnError before any
# big allocation (never a raw MemoryError): tile pairs listed one by one cost about
# BYTES_PER_PAIR at peak (keys, sort, classes), interval rows about BYTES_PER_ROW per query tile.
PLAN_BYTES = 4 << 30
BYTES_PER_PAIR = 64
BYTES_PER_ROW = 256


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


# --------------------------------------------------------------------------------------------
# Tiles of one plan: geometry shared by every pass
# --------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """The ordering, both sides' tiles and one batch item's inputs, with derived per-tile data."""

    layout: Layout
    ordering: Ordering
    Q: TileSet
    K: TileSet
    inputs: Mapping[str, np.ndarray]
    _cache: dict = field(default_factory=dict)
    content: Mapping[Any, np.ndarray] = field(default_factory=dict)  # routing decisions (route)
    head: int = 0  # the query head whose content is planned

    @property
    def nq(self) -> int:
        return self.Q.count

    @property
    def nk(self) -> int:
        return self.K.count

    def side(self, s: str) -> TileSet:
        return self.Q if s == "q" else self.K

    def coords(self, s: str):
        """Per-piece coordinate bounds, flat bounds and flat contiguity ``[T, P]``."""
        key = ("coords", s)
        if key not in self._cache:
            T = self.side(s)
            dil = np.asarray(self.ordering.dil)
            sizes = np.asarray(self.layout.sizes)
            cmin, cmax = T.g + dil * T.lo, T.g + dil * T.hi
            fmin = np.zeros(cmin.shape[:2], dtype=np.int64)
            fmax = np.zeros_like(fmin)
            for a, L in enumerate(self.layout.sizes):
                fmin, fmax = fmin * L + cmin[..., a], fmax * L + cmax[..., a]
            ext = T.hi - T.lo + 1
            later_full = np.ones(ext.shape[:2], dtype=bool)
            contig = np.ones(ext.shape[:2], dtype=bool)
            for a in reversed(range(self.layout.rank)):
                contig &= (ext[..., a] == 1) | ((dil[a] == 1) & later_full)
                later_full &= (ext[..., a] == sizes[a]) & (dil[a] == 1)
            self._cache[key] = (cmin, cmax, fmin, fmax, contig)
        return self._cache[key]

    def bounds(self, s: str):
        """Per-tile coordinate and flat bounds over valid pieces."""
        cmin, cmax, fmin, fmax, _ = self.coords(s)
        v = self.side(s).pvalid
        big = np.iinfo(np.int64).max
        lo = np.where(v[..., None], cmin, big).min(1)
        hi = np.where(v[..., None], cmax, -1).max(1)
        return lo, hi, np.where(v, fmin, big).min(1), np.where(v, fmax, -1).max(1)

    def tokens(self, s: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tile, token)`` of every valid kernel position of one side: O(N)."""
        key = ("tokens", s)
        if key not in self._cache:
            T = self.side(s)
            pos = np.arange(T.count * T.block, dtype=np.int64)
            tok = self.ordering.tokens_at(pos)
            ok = tok >= 0
            self._cache[key] = (pos[ok] // T.block, tok[ok])
        return self._cache[key]

    def axis_ids(self, s: str, a: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct ``(g, lo, hi)`` intervals of one side's pieces on axis ``a``, and the
        index of each piece's interval ``[T, P]``: per-axis classes are tabled on these."""
        key = ("axis_ids", s, a)
        if key not in self._cache:
            T = self.side(s)
            trip = np.stack([T.g[..., a], T.lo[..., a], T.hi[..., a]], -1).reshape(-1, 3)
            u, inv = np.unique(trip, axis=0, return_inverse=True)
            self._cache[key] = (u, inv.reshape(T.g.shape[:2]))
        return self._cache[key]

    def count_tokens(self, s: str, pred) -> np.ndarray:
        tile, tok = self.tokens(s)
        return np.bincount(tile[pred(tok)], minlength=self.side(s).count)


# --------------------------------------------------------------------------------------------
# candidates: regions of key tiles per query tile
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """Key tiles that may be non-empty, per query tile: ``boxes`` (per family, half-open
    tile-grid ranges ``lo, hi`` of shape ``[nq, dims]``), explicit sorted ``pairs``
    (``qt * nk + kt``), or an ``outer`` product of a query-tile mask and a key-tile mask."""

    kind: str
    boxes: tuple = ()
    pairs: np.ndarray | None = None
    qmask: np.ndarray | None = None
    kmask: np.ndarray | None = None

    def count(self) -> int:
        if self.kind == "boxes":
            return int(sum(np.prod(np.maximum(hi - lo, 0), axis=1).sum() for lo, hi in self.boxes))
        if self.kind == "pairs":
            return len(self.pairs)
        return int(self.qmask.sum()) * int(self.kmask.sum())

    def expand(self, ctx: Ctx) -> np.ndarray:
        if self.kind == "pairs":
            return self.pairs
        if self.kind == "outer":
            qs, ks = np.nonzero(self.qmask)[0], np.nonzero(self.kmask)[0]
            return (qs[:, None] * ctx.nk + ks[None, :]).reshape(-1)
        parts = [_expand_box(ctx, lo, hi) for lo, hi in self.boxes]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        if len(parts) == 1:
            return parts[0]
        keys = np.sort(np.concatenate(parts))  # sort and drop repeats: np.unique hashes slower here
        return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys

    def contains(self, ctx: Ctx, keys: np.ndarray) -> np.ndarray:
        qt, kt = np.divmod(keys, ctx.nk)
        if self.kind == "pairs":
            i = np.minimum(np.searchsorted(self.pairs, keys), max(len(self.pairs) - 1, 0))
            return (self.pairs[i] == keys) if len(self.pairs) else np.zeros(len(keys), bool)
        if self.kind == "outer":
            return self.qmask[qt] & self.kmask[kt]
        kc = _kv_grid(ctx)[kt]
        ok = np.zeros(len(keys), dtype=bool)
        for lo, hi in self.boxes:
            ok |= ((kc >= lo[qt]) & (kc < hi[qt])).all(axis=1)
        return ok


def _kv_grid(ctx: Ctx) -> np.ndarray:
    """Tile-grid coordinates of every key tile ``[nk, dims]``."""
    if ctx.ordering.is_natural:
        return np.arange(ctx.nk, dtype=np.int64)[:, None]
    return ctx.K.grid


def _expand_box(ctx: Ctx, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``qt * nk + kt`` for every key tile in each query tile's box ``lo <= c < hi`` (any order)."""
    ext = np.maximum(hi - lo, 0)
    shapes, inv = np.unique(ext, axis=0, return_inverse=True)
    if len(shapes) <= 64:
        # Few box shapes (interior tiles share one): each shape's key tiles are fixed offsets
        # from the box corner in the ravelled tile grid, so the expansion is one broadcast add.
        if ctx.ordering.is_natural:
            grid, lookup = (ctx.nk,), None
        else:
            grid = tuple(U // b for U, b in zip(ctx.ordering.axis_len, ctx.ordering.box_kv))
            lookup = ctx._cache.setdefault("lookup", ctx.ordering.grid_lookup("kv"))
        strides = np.array([math.prod(grid[a + 1:]) for a in range(len(grid))], dtype=np.int64)
        base = lo @ strides
        out = []
        for u, shape in enumerate(shapes):
            if not shape.all():
                continue
            rows = np.nonzero(inv.reshape(-1) == u)[0]
            offs = np.indices(tuple(shape)).reshape(len(shape), -1).T @ strides
            flat = (base[rows, None] + offs[None, :]).reshape(-1)
            kt = flat if lookup is None else lookup[flat]
            out.append(np.repeat(rows, len(offs)) * ctx.nk + kt)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    n = np.prod(ext, axis=1)
    total = int(n.sum())
    qt = np.repeat(np.arange(len(n), dtype=np.int64), n)
    local = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    e, start = ext[qt], lo[qt]
    coords = np.empty_like(e)
    for a in reversed(range(e.shape[1])):
        local, coords[:, a] = np.divmod(local, np.maximum(e[:, a], 1))
    coords += start
    if ctx.ordering.is_natural:
        kt = coords[:, 0]
    else:
        shape = tuple(U // b for U, b in zip(ctx.ordering.axis_len, ctx.ordering.box_kv))
        kt = ctx._cache.setdefault("lookup", ctx.ordering.grid_lookup("kv"))[
            np.ravel_multi_index(tuple(coords.T), shape)]
    return qt * ctx.nk + kt


def _flat_region(ctx: Ctx, klo: np.ndarray, khi: np.ndarray) -> Region:
    """Key tiles holding tokens with flat index in ``[klo, khi]`` (empty where klo > khi)."""
    n = ctx.layout.n
    empty = klo > khi
    klo, khi = np.clip(klo, 0, n - 1), np.clip(khi, 0, n - 1)
    if ctx.ordering.is_natural:
        lo, hi = klo // ctx.K.block, khi // ctx.K.block + 1
        return Region("boxes", ((lo[:, None], np.where(empty, lo, hi)[:, None]),))
    # Coordinate bounding box of a flat interval: an axis is free once an outer axis differs.
    cl, ch = ctx.layout.coords(klo), ctx.layout.coords(khi)
    same = np.ones(len(klo), dtype=bool)
    ulo, uhi = [], []
    for a, L in enumerate(ctx.layout.sizes):
        ulo.append(np.where(same, cl[a], 0))
        uhi.append(np.where(same, ch[a], L - 1))
        same &= cl[a] == ch[a]
    return _coord_region(ctx, np.stack(ulo, 1), np.stack(uhi, 1), empty, grouped=None)


def _coord_region(ctx: Ctx, xlo, xhi, empty, grouped) -> Region:
    """Key tiles meeting the coordinate box ``[xlo, xhi]`` (inclusive, ``[nq, rank]``).

    ``grouped`` optionally gives per-axis in-group ranges (``(g, lo', hi')``) on
    dilation-grouped axes; other grouped axes are taken whole.
    """
    o = ctx.ordering
    if o.is_natural:
        sizes = ctx.layout.sizes
        flo = np.zeros(len(xlo), dtype=np.int64)
        fhi = np.zeros_like(flo)
        for a, L in enumerate(sizes):
            flo, fhi = flo * L + xlo[:, a], fhi * L + xhi[:, a]
        return _flat_region(ctx, np.where(empty, 1, flo), np.where(empty, 0, fhi))
    lo, hi = [], []
    for a, (d, P, U, b) in enumerate(zip(o.dil, o.group_len, o.axis_len, o.box_kv)):
        if d == 1:
            ulo, uhi = xlo[:, a], xhi[:, a]
        elif grouped is not None and grouped[a] is not None:
            g, glo, ghi = grouped[a]
            ulo, uhi = g * P + glo, g * P + ghi
        else:
            ulo, uhi = np.zeros(len(xlo), dtype=np.int64), np.full(len(xlo), U - 1)
        lo.append(ulo // b)
        hi.append(np.where(empty | (uhi < ulo), ulo // b, uhi // b + 1))
    return Region("boxes", ((np.stack(lo, 1), np.stack(hi, 1)),))


def region(t: Term, ctx: Ctx) -> Region:
    """Per query tile, a superset of the key tiles where ``t`` allows some pair."""
    allq, allk = ctx.Q.nvalid > 0, ctx.K.nvalid > 0
    if t.op in ("full", "not"):
        return Region("outer", qmask=allq, kmask=allk)
    if t.op == "none":
        return Region("boxes")
    if t.op == "band":
        _, _, fmin, fmax = ctx.bounds("q")
        lo = fmin + (t.arg.lo if t.arg.lo != -INF else -ctx.layout.n)
        hi = fmax + (t.arg.hi if t.arg.hi != INF else ctx.layout.n)
        return _flat_region(ctx, lo.astype(np.int64), hi.astype(np.int64))
    if t.op == "axes":
        cmin, cmax, _, _ = ctx.bounds("q")
        xlo, xhi, grouped = [], [], []
        for a, preds in enumerate(t.arg.preds):
            lo, hi = np.zeros(ctx.nq, dtype=np.int64), np.full(ctx.nq, ctx.layout.sizes[a] - 1)
            gr = None
            for p in preds:
                plo, phi = p.reach(np.minimum(cmin[:, a], cmax[:, a]), cmax[:, a])
                lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
                d = ctx.ordering.dil[a]
                if d > 1 and p.kind == "nbhd" and p.args[1] == d and gr is None:
                    gr = (ctx.Q.g[:, 0, a],) + p.reach_grouped(ctx.Q.g[:, 0, a], ctx.Q.lo[:, 0, a],
                                                               ctx.Q.hi[:, 0, a])
            xlo.append(lo)
            xhi.append(hi)
            grouped.append(gr)
        xlo, xhi = np.stack(xlo, 1), np.stack(xhi, 1)
        empty = (xlo > xhi).any(1) | ~allq
        return _coord_region(ctx, xlo, xhi, empty, grouped)
    if t.op in ("keys", "queries", "valid"):
        cq, ck = _token_counts(t, ctx)
        return Region("outer", qmask=cq > 0, kmask=ck > 0)
    if t.op in ("random", "same"):
        keys, _ = _join(t, ctx)
        return Region("pairs", pairs=keys)
    if t.op == "route":
        keys, _ = _route_join(t, ctx)
        return Region("pairs", pairs=keys)
    regs = [region(i, ctx) for i in t.items]
    if t.op == "or":
        if all(r.kind == "boxes" for r in regs) and len({r.boxes[0][0].shape[1] for r in regs if r.boxes}) <= 1:
            return Region("boxes", tuple(b for r in regs for b in r.boxes))
        _check_pairs(sum(r.count() for r in regs), ctx)
        return Region("pairs", pairs=np.unique(np.concatenate([r.expand(ctx) for r in regs])))
    # and: generate from the most selective child, keep what every other child may allow
    counts = [r.count() for r in regs]
    best = int(np.argmin(counts))
    _check_pairs(counts[best], ctx)
    keys = regs[best].expand(ctx)
    for i, r in enumerate(regs):
        if i != best and len(keys):
            keys = keys[r.contains(ctx, keys)]
    return Region("pairs", pairs=np.sort(keys))


# --------------------------------------------------------------------------------------------
# classify: exact classes of candidate tile pairs
# --------------------------------------------------------------------------------------------

def _sel_pred(sel):
    if isinstance(sel, Range):
        return lambda tok: (tok >= sel.lo) & (tok < sel.hi)
    return lambda tok: np.isin(tok, np.asarray(sel.values, dtype=np.int64))


def _token_counts(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, how many of its tokens the leaf's token condition holds for (q and k sides)."""
    key = ("counts", id(t))
    if key not in ctx._cache:
        if t.op == "valid":
            n = _length(ctx.inputs, t.arg.input, ctx.layout.n)
            pq = pk = lambda tok: tok < n  # noqa: E731
        elif t.op == "keys":
            pq, pk = (lambda tok: np.ones(len(tok), bool)), _sel_pred(t.arg.sel)
        else:
            pq, pk = _sel_pred(t.arg.sel), (lambda tok: np.ones(len(tok), bool))
        ctx._cache[key] = (ctx.count_tokens("q", pq), ctx.count_tokens("kv", pk))
    return ctx._cache[key]


def _join(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Tile pairs sharing a (query group, key group) relation, with their exact classes.

    ``same``: groups are ids, related when equal. ``random``: groups are blocks, related when
    drawn. A pair is FULL when every (query group, key group) combination is related.
    """
    key = ("join", id(t))
    if key in ctx._cache:
        return ctx._cache[key]
    if t.op == "same":
        ids = _ids(ctx.inputs, t.arg.input, ctx.layout.n)
        _, inv = np.unique(ids, return_inverse=True)
        grp = lambda tok: inv[tok]  # noqa: E731
        n_groups = int(inv.max()) + 1 if len(inv) else 0
        rel = np.stack([np.arange(n_groups)] * 2, axis=1)
    else:
        B = t.arg.block
        grp = lambda tok: tok // B  # noqa: E731
        table = ctx._cache.setdefault(("table", id(t.arg)), t.arg.table(ctx.layout))
        rel = np.argwhere(table)
    tg = {}
    for s in ("q", "kv"):
        tile, tok = ctx.tokens(s)
        ng = max(int(rel.max()) + 1 if len(rel) else 1, 1)
        u = np.unique(tile * ng + grp(tok))
        tiles, groups = np.divmod(u, ng)
        order = np.argsort(groups, kind="stable")
        tiles, groups = tiles[order], groups[order]
        indptr = np.searchsorted(groups, np.arange(ng + 1))
        tg[s] = (tiles, indptr, np.bincount(tiles, minlength=ctx.side(s).count))
    (qtiles, qptr, qn), (ktiles, kptr, kn) = tg["q"], tg["kv"]
    a, b = rel[:, 0], rel[:, 1]
    ca, cb = qptr[a + 1] - qptr[a], kptr[b + 1] - kptr[b]
    # Expand each related (a, b) into its query tiles x key tiles.
    n1 = ca * cb
    r = np.repeat(np.arange(len(rel)), n1)
    local = np.arange(int(n1.sum()), dtype=np.int64) - np.repeat(np.cumsum(n1) - n1, n1)
    i, j = np.divmod(local, np.maximum(cb[r], 1))
    qt, kt = qtiles[qptr[a[r]] + i], ktiles[kptr[b[r]] + j]
    keys, mult = np.unique(qt * ctx.nk + kt, return_counts=True)
    q_, k_ = np.divmod(keys, ctx.nk)
    cls = np.where(mult == qn[q_] * kn[k_], FULL, PARTIAL).astype(np.int8)
    ctx._cache[key] = (keys, cls)
    return keys, cls


def _route_join(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Tile pairs of a route term with exact classes, from the head's selection table.

    Query tokens map to query groups, keys to (possibly permuted) key blocks; a tile pair is
    FULL when every (group, block) combination among its tokens is selected, PARTIAL when some
    is, and never listed when none is: O(selected pairs x tiles they touch), no N x N work.
    """
    r: Route = t.arg
    key = ("route", id(r), ctx.head)
    if key in ctx._cache:
        return ctx._cache[key]
    from attnlang.routing import block_ids, group_ids

    if r not in ctx.content:
        raise AttnError("this pattern reads Q/K content (route): plan it per call with "
                        "make_plan(pattern, content=attnlang.routing.pattern_content(pattern, q, k))")
    sel = np.asarray(ctx.content[r][ctx.head])
    qgrp = group_ids(r, ctx.layout)
    kgrp = block_ids(r, ctx.layout) if r.permute is None else \
        np.asarray(ctx.content[(r, "pos")][ctx.head]) // r.block[0]
    tg = {}
    for s, grp, ng in (("q", qgrp, sel.shape[0]), ("kv", kgrp, sel.shape[1])):
        tile, tok = ctx.tokens(s)
        u = np.unique(tile * ng + grp[tok])
        tiles, groups = np.divmod(u, ng)
        order = np.argsort(groups, kind="stable")
        tiles, groups = tiles[order], groups[order]
        tg[s] = (tiles, np.searchsorted(groups, np.arange(ng + 1)), np.bincount(tiles, minlength=ctx.side(s).count))
    (qtiles, qptr, qn), (ktiles, kptr, kn) = tg["q"], tg["kv"]
    a, b = np.nonzero(sel)
    ca, cb = qptr[a + 1] - qptr[a], kptr[b + 1] - kptr[b]
    n1 = ca * cb
    rr = np.repeat(np.arange(len(a)), n1)
    local = np.arange(int(n1.sum()), dtype=np.int64) - np.repeat(np.cumsum(n1) - n1, n1)
    i, j = np.divmod(local, np.maximum(cb[rr], 1))
    keys, mult = np.unique(qtiles[qptr[a[rr]] + i] * ctx.nk + ktiles[kptr[b[rr]] + j], return_counts=True)
    q_, k_ = np.divmod(keys, ctx.nk)
    cls = np.where(mult == qn[q_] * kn[k_], FULL, PARTIAL).astype(np.int8)
    ctx._cache[key] = (keys, cls)
    return keys, cls


def classify(t: Term, ctx: Ctx, qt: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """Class of each (qt, kt) pair under term ``t``; UNKNOWN where the rules cannot decide."""
    n = len(qt)
    if t.op == "full":
        return np.full(n, FULL, dtype=np.int8)
    if t.op == "none":
        return np.full(n, EMPTY, dtype=np.int8)
    if t.op == "not":
        return not3(classify(t.items[0], ctx, qt, kt))
    if t.op in ("and", "or"):
        cs = [classify(i, ctx, qt, kt) for i in t.items]
        return and3(cs) if t.op == "and" else or3(cs)
    if t.op in ("random", "same", "route"):
        keys, cls = _join(t, ctx) if t.op != "route" else _route_join(t, ctx)
        want = qt * ctx.nk + kt
        if not len(keys):
            return np.full(n, EMPTY, dtype=np.int8)
        i = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        return np.where(keys[i] == want, cls[i], EMPTY).astype(np.int8)
    if t.op in ("keys", "queries", "valid"):
        cq, ck = _token_counts(t, ctx)
        a, b = cq[qt], ck[kt]
        full = (a == ctx.Q.nvalid[qt]) & (b == ctx.K.nvalid[kt])
        return np.where((a == 0) | (b == 0), EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)
    # Piece-level terms: [n, Pq, 1] x [n, 1, Pk], then the union over pieces.
    valid = ctx.Q.pvalid[qt][:, :, None] & ctx.K.pvalid[kt][:, None, :]
    if t.op == "band":
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
        if u.op == "axes":
            if not any(u is x for x in leaves):
                leaves.append(u)
            return True
        if u.op in ("full", "none"):
            return True
        return u.op in ("and", "or", "not") and all(walk(i) for i in u.items)
    return leaves if walk(t) and 0 < len(leaves) <= MAX_PRODUCT_LEAVES else None


def _truth(t: Term, leaves: list[Term], m: np.ndarray) -> np.ndarray:
    """The term's value for each leaf assignment ``m`` (bit i = leaf i holds)."""
    if t.op == "axes":
        return (m >> next(i for i, x in enumerate(leaves) if x is t)) & 1 == 1
    if t.op in ("full", "none"):
        return np.full(m.shape, t.op == "full")
    vals = [_truth(i, leaves, m) for i in t.items]
    if t.op == "not":
        return ~vals[0]
    return np.logical_and.reduce(vals) if t.op == "and" else np.logical_or.reduce(vals)


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
    tables = _interval_tables(t, ctx)
    if tables is not None:
        return tables[0], tables[1], 0
    # Sorted by (qt, kt) for the CSR tables; sort-and-drop-repeats beats np.unique's hashing here.
    reg = region(t, ctx)
    _check_pairs(reg.count(), ctx)
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


def _check_pairs(count: int, ctx: Ctx) -> None:
    """Refuse, before allocating them, more candidate tile pairs than PLAN_BYTES allows."""
    if count * BYTES_PER_PAIR > PLAN_BYTES:
        raise AttnError(
            f"planning this pattern lists {count:,} tile pairs of {ctx.Q.block} x {ctx.K.block} tokens "
            f"(about {count * BYTES_PER_PAIR / 2**30:.0f} GiB; the planning budget is "
            f"{PLAN_BYTES / 2**30:.0f} GiB): too large at N = {ctx.layout.n}",
            hint="use larger tiles (schedule tile(q = 128, kv = 128) or block_m/block_n up to 256) "
                 "or a smaller N; bands, windows and blocks in natural order plan in O(query tiles) "
                 "(see docs/simulator.md, planning memory)")


def _check_rows(n_kernel: int, bm: int, bn: int) -> None:
    """Refuse sizes whose per-tile arrays alone exceed PLAN_BYTES (or int32 tile indices)."""
    tiles = -(-n_kernel // min(bm, bn))
    if tiles * BYTES_PER_ROW > PLAN_BYTES or n_kernel >= 2 ** 31:
        raise AttnError(
            f"N = {n_kernel} tokens in tiles of {min(bm, bn)} is {tiles:,} tiles per side: too large to plan "
            f"(at most {min(PLAN_BYTES // BYTES_PER_ROW, (2 ** 31 - 1) // min(bm, bn)):,} tiles and 2^31 - 1 "
            "tokens)", hint="use larger tiles (up to 256 tokens) or a smaller N")


def _csr(qt: np.ndarray, kt: np.ndarray, rows: int, cols: int) -> BlockTable:
    """CSR from pairs already sorted by (qt, kt)."""
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(qt, minlength=rows), out=indptr[1:])
    return BlockTable(indptr, kt.astype(np.int32), cols)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

# Checked once, at make_plan, by attnlang.inputs (ids [N] and a 0-d length, int64); these only read.
def _ids(inputs: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    return np.asarray(inputs[name]).reshape(-1).astype(np.int64)


def _length(inputs: Mapping[str, np.ndarray], name: str, n: int) -> int:
    return int(np.asarray(inputs[name]).reshape(()))


def _check_inputs(pattern: Pattern, inputs: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    return check_inputs(pattern, inputs, item=True)


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
    got = _check_inputs(pattern, inputs)
    if pattern.reads_content and not isinstance(pattern.attend, Pyramid):
        return _plan_routed(pattern, got, content, block_m, block_n, order)
    if isinstance(pattern.attend, Pyramid):  # (query tile, key block, level) from the content
        from attnlang.pyramid import plan as pyramid_plan

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
    _check_rows(ordering.n_kernel, bm, bn)
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
    _check_rows(layout.n, bm, bn)
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
    _check_rows(ordering.n_kernel, bm, bn)
    ctx = Ctx(layout, ordering, ordering.tiles("q", bm), ordering.tiles("kv", bn), inputs)
    groups, pairs = [], []
    checked = 0
    for i, (lo, hi, e) in enumerate(pattern.exprs()):
        part, full, n_el = searched[i] if searched is not None else plan_group(e, ctx)
        checked += n_el
        term = lower(e, layout)
        analytic = (functools.partial(_analytic, term, layout, ordering, bm, bn, part, full)
                    if layout.rank == 1 and ordering.is_natural and _band_blocks(term) is not None else None)
        by_head = not isinstance(pattern.attend, Expr)
        groups.append(HeadGroup.of(lo, hi if by_head else None, part, full, analytic))
        pairs.append(_allowed_pairs(term, layout, inputs))
    if checked:
        notes = notes + [f"{checked} tile pair(s) undecidable by the rules were checked per element"]
    if any(g.closed_form is not None for g in groups):
        notes = notes + ["analytic: closed-form key-tile ranges per query tile (codegen loop bounds, "
                         "derived on first use)"]
    allowed = tuple(pairs) if all(p is not None for p in pairs) else None
    return Plan(pattern, bm, bn, ordering.box_q or (bm,), ordering.box_kv or (bn,),
                ordering.positions(), tuple(groups), tuple(notes), allowed)


# --------------------------------------------------------------------------------------------
# Closed forms: analytic tile ranges and allowed pair counts
# --------------------------------------------------------------------------------------------

def _band_blocks(term: Term) -> tuple[Band, list[tuple[int, int]]] | None:
    """A 1-D conjunction of bands and blocks as (band, [(size, shift)]), else None."""
    items = term.items if term.op == "and" else (term,)
    band, blocks = Band(-INF, INF), []
    for t in items:
        if t.op == "band":
            band = band & t.arg
        elif t.op == "axes" and all(p.kind == "block" for p in t.arg.preds[0]):
            blocks += [p.args for p in t.arg.preds[0]]
        elif t.op != "full":
            return None
    return band, blocks


def _analytic(term: Term, layout: Layout, ordering: Ordering, bm: int, bn: int,
              part: BlockTable, full: BlockTable) -> TileRange | None:
    """Closed-form key-tile ranges (sympy, in the symbol ``qt``) for 1-D bands and blocks,
    kept only when they reproduce the tables exactly."""
    if layout.rank != 1 or not ordering.is_natural:
        return None
    bb = _band_blocks(term)
    if bb is None:
        return None
    from attnlang.closed_form import band_tile_range  # sympy: only when a plan asks, not at import

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
    items = term.items if term.op == "and" else (term,)
    for t in items:
        if t.op == "not":
            continue  # subtracted below, once the positive terms bound the interval
        if t.op == "band":
            if t.arg.lo != -INF:
                lo = np.maximum(lo, q + int(max(t.arg.lo, -n)))
            if t.arg.hi != INF:
                hi = np.minimum(hi, q + int(min(t.arg.hi, n)))
        elif t.op == "axes" and layout.rank == 1:
            for p in t.arg.preds[0]:
                if p.kind == "strided" or (p.kind == "nbhd" and p.args[1] > 1):
                    return None
                plo, phi = p.reach(q, q)
                lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
        elif t.op == "valid":
            m = _length(inputs, t.arg.input, n)
            hi = np.where(q < m, np.minimum(hi, m - 1), -1)
        elif t.op in ("keys", "queries") and isinstance(t.arg.sel, Range):
            r = t.arg.sel
            if t.op == "keys":
                lo, hi = np.maximum(lo, r.lo), np.minimum(hi, r.hi - 1)
            else:
                hi = np.where((q >= r.lo) & (q < r.hi), hi, -1)
        elif t.op == "none":
            hi = np.full(len(q), -1, dtype=np.int64)
        elif t.op != "full":
            return None
    for t in items:
        if t.op != "not":
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


def _interval_tables(term: Term, ctx: Ctx) -> tuple[BlockTable, BlockTable] | None:
    """Range tables of a natural-order plan whose query rows are key intervals (bands, blocks,
    windows, ``valid``, key/query ranges and their conjunctions); None when they are not.

    Every row is then one range of visited key tiles with one range of full ones inside it,
    exact: a key tile is FULL iff every query of the (complete) query tile allows all of its
    (complete) keys, i.e. it lies in ``[max lo, min hi]``; it is visited iff some query's
    interval meets it, which is the range ``[min lo, max hi]`` when the queries' tile intervals
    chain without gaps (checked; otherwise None and the general path decides). O(N) time,
    O(query tiles) memory: a causal plan at N = 2^20 stores 16k rows, not 134M tiles.
    """
    if not ctx.ordering.is_natural or term.op == "or":
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


def _allowed_pairs(term: Term, layout: Layout, inputs) -> int | None:
    """Exact allowed (q, k) pair count in closed form or O(N), else None."""
    n = layout.n
    if term.op == "full":
        return n * n
    if term.op == "none":
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
    if term.op != "axes":
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


__all__ = ["make_plan", "lower", "Term", "Axes", "plan_group", "DEFAULT_BLOCK", "BLOCK_SIZES"]
