"""Pass 3, candidates: per query tile, the key tiles that may be non-empty — a superset from each
term's key reach, never all key tiles unless the pattern needs them. Pure:
``region(term, ctx) -> Region``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from attnlang.passes.joins import join_pairs, route_join_pairs, token_counts
from attnlang.passes.lower import Op, Term
from attnlang.passes.tiles import Ctx, check_pairs
from attnlang.pattern import INF
from attnlang.tiling import AxisKind


# --------------------------------------------------------------------------------------------
# candidates: regions of key tiles per query tile
# --------------------------------------------------------------------------------------------

class RegionKind(str, Enum):
    """How a :class:`Region` stores its candidate key tiles."""

    BOXES = "boxes"  # half-open tile-grid ranges per query tile
    PAIRS = "pairs"  # explicit sorted qt * nk + kt keys
    OUTER = "outer"  # a query-tile mask times a key-tile mask


@dataclass(frozen=True)
class Region:
    """Key tiles that may be non-empty, per query tile: ``boxes`` (per family, half-open
    tile-grid ranges ``lo, hi`` of shape ``[nq, dims]``), explicit sorted ``pairs``
    (``qt * nk + kt``), or an ``outer`` product of a query-tile mask and a key-tile mask."""

    kind: RegionKind
    boxes: tuple = ()
    pairs: np.ndarray | None = None
    qmask: np.ndarray | None = None
    kmask: np.ndarray | None = None

    def count(self) -> int:
        if self.kind == RegionKind.BOXES:
            return int(sum(np.prod(np.maximum(hi - lo, 0), axis=1).sum() for lo, hi in self.boxes))
        if self.kind == RegionKind.PAIRS:
            return len(self.pairs)
        return int(self.qmask.sum()) * int(self.kmask.sum())

    def expand(self, ctx: Ctx) -> np.ndarray:
        if self.kind == RegionKind.PAIRS:
            return self.pairs
        if self.kind == RegionKind.OUTER:
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
        if self.kind == RegionKind.PAIRS:
            i = np.minimum(np.searchsorted(self.pairs, keys), max(len(self.pairs) - 1, 0))
            return (self.pairs[i] == keys) if len(self.pairs) else np.zeros(len(keys), bool)
        if self.kind == RegionKind.OUTER:
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
        return Region(RegionKind.BOXES, ((lo[:, None], np.where(empty, lo, hi)[:, None]),))
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
    return Region(RegionKind.BOXES, ((np.stack(lo, 1), np.stack(hi, 1)),))


def region(t: Term, ctx: Ctx) -> Region:
    """Per query tile, a superset of the key tiles where ``t`` allows some pair."""
    allq, allk = ctx.Q.nvalid > 0, ctx.K.nvalid > 0
    if t.op in (Op.FULL, Op.NOT):
        return Region(RegionKind.OUTER, qmask=allq, kmask=allk)
    if t.op == Op.NONE:
        return Region(RegionKind.BOXES)
    if t.op == Op.BAND:
        _, _, fmin, fmax = ctx.bounds("q")
        lo = fmin + (t.arg.lo if t.arg.lo != -INF else -ctx.layout.n)
        hi = fmax + (t.arg.hi if t.arg.hi != INF else ctx.layout.n)
        return _flat_region(ctx, lo.astype(np.int64), hi.astype(np.int64))
    if t.op == Op.AXES:
        cmin, cmax, _, _ = ctx.bounds("q")
        xlo, xhi, grouped = [], [], []
        for a, preds in enumerate(t.arg.preds):
            lo, hi = np.zeros(ctx.nq, dtype=np.int64), np.full(ctx.nq, ctx.layout.sizes[a] - 1)
            gr = None
            for p in preds:
                plo, phi = p.reach(np.minimum(cmin[:, a], cmax[:, a]), cmax[:, a])
                lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
                d = ctx.ordering.dil[a]
                if d > 1 and p.kind == AxisKind.NBHD and p.args[1] == d and gr is None:
                    gr = (ctx.Q.g[:, 0, a],) + p.reach_grouped(ctx.Q.g[:, 0, a], ctx.Q.lo[:, 0, a],
                                                               ctx.Q.hi[:, 0, a])
            xlo.append(lo)
            xhi.append(hi)
            grouped.append(gr)
        xlo, xhi = np.stack(xlo, 1), np.stack(xhi, 1)
        empty = (xlo > xhi).any(1) | ~allq
        return _coord_region(ctx, xlo, xhi, empty, grouped)
    if t.op in (Op.KEYS, Op.QUERIES, Op.VALID):
        cq, ck = token_counts(t, ctx)
        return Region(RegionKind.OUTER, qmask=cq > 0, kmask=ck > 0)
    if t.op in (Op.RANDOM, Op.SAME):
        keys, _ = join_pairs(t, ctx)
        return Region(RegionKind.PAIRS, pairs=keys)
    if t.op == Op.ROUTE:
        keys, _ = route_join_pairs(t, ctx)
        return Region(RegionKind.PAIRS, pairs=keys)
    regs = [region(i, ctx) for i in t.items]
    if t.op == Op.OR:
        if all(r.kind == RegionKind.BOXES for r in regs) and len({r.boxes[0][0].shape[1] for r in regs if r.boxes}) <= 1:
            return Region(RegionKind.BOXES, tuple(b for r in regs for b in r.boxes))
        check_pairs(sum(r.count() for r in regs), ctx)
        return Region(RegionKind.PAIRS, pairs=np.unique(np.concatenate([r.expand(ctx) for r in regs])))
    # and: generate from the most selective child, keep what every other child may allow
    counts = [r.count() for r in regs]
    best = int(np.argmin(counts))
    check_pairs(counts[best], ctx)
    keys = regs[best].expand(ctx)
    for i, r in enumerate(regs):
        if i != best and len(keys):
            keys = keys[r.contains(ctx, keys)]
    return Region(RegionKind.PAIRS, pairs=np.sort(keys))
