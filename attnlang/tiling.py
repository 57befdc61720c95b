"""Exact tile classification of primitives: EMPTY / PARTIAL / FULL for (query tile, key tile).

The planner never looks at the N x N mask. Each primitive answers for whole tiles, vectorised
over arrays of tile pairs:

* per-axis primitives (neighborhood, block, strided, grid, halo, axial, ``causal(a)``) factor
  into one 1-D predicate per axis (:class:`AxisPred`); on a box (a product of per-axis sets) a
  product predicate is FULL iff every axis is FULL and EMPTY iff some axis is EMPTY — exact.
  A 1-D answer that the interval rules cannot decide (``UNKNOWN``, e.g. a conjunction of two
  partial 1-D predicates) is settled by evaluating that axis only: ``extent_q x extent_k``
  coordinates instead of ``block_m x block_n`` tokens;
* flat bands (``causal``, ``window`` and their conjunctions) are closed forms on the flat index
  range of a piece (:func:`band_class`);
* tiles that are unions of pieces (a flat interval of a multi-dimensional grid) combine their
  pieces' answers with :func:`union_class`, exact when each piece's answer is.

Combinators use three-valued logic (:func:`and3`, :func:`or3`, :func:`not3`) with a fourth value,
``UNKNOWN``, for the cases the rules cannot decide; the planner settles those per element.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import numpy as np

from attnlang.pattern import (
    And, Axial, Block, Causal, Empty, Env, Expr, Full, Grid, Halo, Keys, Layout, Neighborhood, Not,
    Or, Points, Queries, Random, Route, Same, Strided, Valid, Window, natten_window,
)
from attnlang.plan import EMPTY, FULL, PARTIAL, UNKNOWN


class AxisKind(str, Enum):
    """What a 1-D predicate (:class:`AxisPred`) is; ``str`` so logs and reprs stay readable."""

    CAUSAL = "causal"  # k <= q
    EQ = "eq"  # k == q (axial, on the other axes)
    BLOCK = "block"
    HALO = "halo"
    STRIDED = "strided"  # strided and grid
    NBHD = "nbhd"  # NATTEN neighborhood


# --------------------------------------------------------------------------------------------
# Three-valued logic (plus UNKNOWN)
# --------------------------------------------------------------------------------------------

def and3(classes: list[np.ndarray]) -> np.ndarray:
    """EMPTY if any is EMPTY; FULL if all are FULL; PARTIAL if exactly one is not FULL and it is
    PARTIAL; otherwise UNKNOWN (two partial sets may or may not meet)."""
    c = np.stack(classes)
    any_empty = (c == EMPTY).any(0)
    not_full = (c != FULL).sum(0)
    any_unknown = (c == UNKNOWN).any(0)
    out = np.where(not_full == 0, FULL, np.where((not_full == 1) & ~any_unknown, PARTIAL, UNKNOWN))
    return np.where(any_empty, EMPTY, out).astype(np.int8)


def not3(c: np.ndarray) -> np.ndarray:
    """Complement: FULL <-> EMPTY; PARTIAL and UNKNOWN stay."""
    return np.choose(c, [FULL, PARTIAL, EMPTY, UNKNOWN]).astype(np.int8)


def or3(classes: list[np.ndarray]) -> np.ndarray:
    """Dual of :func:`and3` (De Morgan): FULL if any is FULL; EMPTY if all are EMPTY; PARTIAL if
    exactly one is not EMPTY and it is PARTIAL; otherwise UNKNOWN."""
    c = np.stack(classes)
    not_empty = (c != EMPTY).sum(0)
    any_unknown = (c == UNKNOWN).any(0)
    out = np.where(not_empty == 0, EMPTY, np.where((not_empty == 1) & ~any_unknown, PARTIAL, UNKNOWN))
    return np.where((c == FULL).any(0), FULL, out).astype(np.int8)


def union_class(c: np.ndarray, valid: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Class of a union of disjoint pieces from the classes of the pieces (invalid ones ignored)."""
    unknown = ((c == UNKNOWN) & valid).any(axis)
    all_full = ((c == FULL) | ~valid).all(axis)
    all_empty = ((c == EMPTY) | ~valid).all(axis)
    out = np.where(all_empty, EMPTY, np.where(all_full, FULL, PARTIAL))
    return np.where(unknown, UNKNOWN, out).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Flat bands: lo <= k - q <= hi
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Band:
    """``lo <= k - q <= hi`` in flat order: ``causal`` is ``(-inf, 0)``, ``window(b, f)`` is
    ``(-b, f)``; a conjunction of bands is one band."""

    lo: float
    hi: float

    def __and__(self, other: "Band") -> "Band":
        return Band(max(self.lo, other.lo), min(self.hi, other.hi))

    @property
    def empty(self) -> bool:
        return self.lo > self.hi


def band_class(band: Band, qmin, qmax, qcontig, kmin, kmax, kcontig) -> np.ndarray:
    """Class of a band on pieces with flat index bounds; exact except when the band lies strictly
    inside the difference range of two pieces that are not flat intervals (then UNKNOWN)."""
    dlo = kmin - qmax  # both extremes are attained by some (q, k) pair
    dhi = kmax - qmin
    empty = (dhi < band.lo) | (dlo > band.hi)
    full = (dlo >= band.lo) & (dhi <= band.hi)
    # An attained extreme inside the band proves a hit; contiguous pieces make every
    # difference in [dlo, dhi] attained.
    hit = ((dlo >= band.lo) & (dlo <= band.hi)) | ((dhi >= band.lo) & (dhi <= band.hi)) | (qcontig & kcontig)
    return np.where(empty, EMPTY, np.where(full, FULL, np.where(hit, PARTIAL, UNKNOWN))).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Per-axis predicates
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AxisPred:
    """One primitive restricted to one axis: ``ir`` is the equivalent 1-D IR node (its
    ``allowed`` is the semantics); ``ir is None`` means equality (``axial`` on other axes)."""

    kind: AxisKind
    L: int
    ir: Expr | None
    args: tuple = ()

    def allowed(self, qc: np.ndarray, kc: np.ndarray) -> np.ndarray:
        if self.ir is None:
            return qc == kc
        layout = Layout.of({"x": self.L})
        return self.ir.allowed(Points(qc, (qc,)), Points(kc, (kc,)), Env(layout))

    # -- exact classes on progressions {g + dil * x' : lo <= x' <= hi} ----------------------
    def classify(self, qg, qlo, qhi, kg, klo, khi, dil: int) -> np.ndarray:
        qmn, qmx, kmn, kmx = qg + dil * qlo, qg + dil * qhi, kg + dil * klo, kg + dil * khi
        shape = np.broadcast_shapes(np.shape(qg), np.shape(kg))
        if self.kind is AxisKind.CAUSAL:  # min/max decide k <= q on any sets
            return np.where(kmn > qmx, EMPTY, np.where(kmx <= qmn, FULL, PARTIAL)).astype(np.int8)
        if self.kind is AxisKind.EQ:
            apart = (qg != kg) | (khi < qlo) | (qhi < klo)
            point = (qlo == qhi) & (klo == khi)
            return np.where(apart, EMPTY, np.where(point, FULL, PARTIAL)).astype(np.int8)
        if self.kind is AxisKind.NBHD and self.args[1] == dil:
            return self._nbhd_grouped(qg, qlo, qhi, kg, klo, khi)
        if dil != 1:  # other predicates on a dilation-grouped axis: settled per element
            return np.full(shape, UNKNOWN, dtype=np.int8)
        ql, qh, kl, kh = np.broadcast_arrays(qmn, qmx, kmn, kmx)
        if self.kind is AxisKind.BLOCK:
            S, o = self.args
            qa, qb, ka, kb = (ql - o) // S, (qh - o) // S, (kl - o) // S, (kh - o) // S
            empty = (kb < qa) | (qb < ka)
            full = (qa == qb) & (ka == kb) & (qa == ka)
        elif self.kind is AxisKind.HALO:
            B, h = self.args
            empty = (kh < (ql // B) * B - h) | (kl > (qh // B) * B + B + h - 1)
            full = (kl >= (qh // B) * B - h) & (kh <= (ql // B) * B + B + h - 1)
        elif self.kind is AxisKind.STRIDED:
            (s,) = self.args
            la, lb = np.minimum(qh - ql + 1, s), np.minimum(kh - kl + 1, s)
            meet = ((kl - ql) % s < la) | ((ql - kl) % s < lb)
            empty = ~meet
            full = (s == 1) | ((la == 1) & (lb == 1) & meet)
        else:  # nbhd with dilation on plain intervals: per dilation group
            return self._nbhd_plain(ql, qh, kl, kh)
        return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)

    def _window(self, i):
        K, d, s, c = self.args
        return natten_window(i, self.L, K, d, s, c)

    def _nbhd_grouped(self, qg, qlo, qhi, kg, klo, khi):
        # Windows move monotonically within a group and overlap, so their union over a range
        # of queries is [start(first), end(last)) and their intersection [start(last), end(first)).
        d = self.args[1]
        _, s_lo, e_lo = self._window(qg + d * qlo)
        _, s_hi, e_hi = self._window(qg + d * qhi)
        empty = (qg != kg) | (khi < s_lo) | (klo >= e_hi)
        full = (qg == kg) & (klo >= s_hi) & (khi < e_lo)
        return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)

    def _nbhd_plain(self, ql, qh, kl, kh):
        d = self.args[1]
        hit = np.zeros(ql.shape, dtype=bool)
        for r in range(d):  # each dilation group is a plain (d = 1) neighborhood
            a, b = (ql - r + d - 1) // d, (qh - r) // d
            c, e = (kl - r + d - 1) // d, (kh - r) // d
            ok = (a <= b) & (c <= e)
            _, s_a, _ = self._window(np.where(ok, r + d * a, 0))
            _, _, e_b = self._window(np.where(ok, r + d * b, 0))
            hit |= ok & (e >= s_a) & (c < e_b)
        point = (ql == qh) & (kl == kh)
        return np.where(~hit, EMPTY, np.where(point, FULL, PARTIAL)).astype(np.int8)

    # -- key reach of a range of queries (a superset of the keys it may see) ------------------
    def reach(self, qmn: np.ndarray, qmx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L = self.L
        if self.kind is AxisKind.CAUSAL:
            lo, hi = np.zeros_like(qmn), qmx
        elif self.kind is AxisKind.EQ:
            lo, hi = qmn, qmx
        elif self.kind is AxisKind.BLOCK:
            S, o = self.args
            lo, hi = ((qmn - o) // S) * S + o, ((qmx - o) // S) * S + o + S - 1
        elif self.kind is AxisKind.HALO:
            B, h = self.args
            lo, hi = (qmn // B) * B - h, (qmx // B) * B + B + h - 1
        elif self.kind is AxisKind.STRIDED:
            lo, hi = np.zeros_like(qmn), np.full_like(qmx, L - 1)
        else:
            d = self.args[1]
            j = np.arange(d)
            first = np.minimum(qmn[..., None] + j, qmx[..., None])  # first query of each group
            last = np.maximum(qmx[..., None] - j, qmn[..., None])
            g0, s0, _ = self._window(first)
            g1, _, e1 = self._window(last)
            lo, hi = (g0 + d * s0).min(-1), (g1 + d * (e1 - 1)).max(-1)
        return np.clip(lo, 0, L - 1), np.clip(hi, 0, L - 1)

    def reach_grouped(self, qg, qlo, qhi):
        """In-group key reach of an in-group query range (``nbhd`` on its own dilation grouping)."""
        d = self.args[1]
        _, s_lo, _ = self._window(qg + d * qlo)
        _, _, e_hi = self._window(qg + d * qhi)
        return s_lo, e_hi - 1


# The tile-rule table: one entry per per-axis primitive, keyed by node type. Each entry appends
# the node's 1-D predicates to ``out[axis]`` (an axis left empty holds everywhere) or returns
# False when this node is not per-axis (flat ``causal``). Flat and content primitives are planned
# from their own terms in the planner; ``FACTOR_LEAVES_OUT`` names them and says why.

def _factor_causal(node: Causal, layout: Layout, out: list) -> bool:
    if node.axis is None:
        return False  # flat order: a band (see Band), not a per-axis predicate
    a = layout.index(node.axis)
    out[a].append(AxisPred(AxisKind.CAUSAL, layout.sizes[a], Causal("x")))
    return True


def _factor_neighborhood(node: Neighborhood, layout: Layout, out: list) -> bool:
    for a, L in enumerate(layout.sizes):
        args = (node.window[a], node.dilation[a], node.stride[a], node.causal[a])
        ir = Neighborhood((args[0],), (args[1],), (args[2],), (args[3],))
        out[a].append(AxisPred(AxisKind.NBHD, L, ir, args))
    return True


def _factor_block(node: Block, layout: Layout, out: list) -> bool:
    for a, L in enumerate(layout.sizes):
        S, o = node.size[a], node.shift[a]
        if S < L or o % S:  # block(L) with an aligned shift holds on the whole axis
            out[a].append(AxisPred(AxisKind.BLOCK, L, Block((S,), (o,)), (S, o)))
    return True


def _factor_steps(steps: tuple[int, ...], layout: Layout, out: list) -> bool:
    for a, L in enumerate(layout.sizes):
        if steps[a] > 1:
            out[a].append(AxisPred(AxisKind.STRIDED, L, Strided((steps[a],)), (steps[a],)))
    return True


def _factor_halo(node: Halo, layout: Layout, out: list) -> bool:
    for a, L in enumerate(layout.sizes):
        B, h = node.block[a], node.halo[a]
        out[a].append(AxisPred(AxisKind.HALO, L, Halo((B,), (h,)), (B, h)))
    return True


def _factor_axial(node: Axial, layout: Layout, out: list) -> bool:
    ax = layout.index(node.axis)
    for a, L in enumerate(layout.sizes):
        if a != ax:
            out[a].append(AxisPred(AxisKind.EQ, L, None))
    return True


FACTOR: dict[type, Callable[[Any, Layout, list], bool]] = {
    Causal: _factor_causal,
    Neighborhood: _factor_neighborhood,
    Block: _factor_block,
    Strided: lambda node, layout, out: _factor_steps(node.step, layout, out),
    Grid: lambda node, layout, out: _factor_steps(node.steps(layout), layout, out),  # strided(L / G)
    Halo: _factor_halo,
    Axial: _factor_axial,
}

FACTOR_LEAVES_OUT: dict[type, str] = {
    Full: "a constant: the planner's `full` term",
    Empty: "a constant: the planner's `none` term",
    Window: "a flat band lo <= k - q <= hi, classified by band_class",
    Keys: "a flat key range or list: the planner's selection term",
    Queries: "a flat query range or list: the planner's selection term",
    Random: "a table of flat blocks: the planner's join term",
    Same: "a runtime input: the planner's join term per call",
    Valid: "a runtime input: the planner's selection term per call",
    Route: "reads Q/K: planned per call from the routing selection",
    And: "a combinator: three-valued and3 in the planner",
    Or: "a combinator: three-valued or3 in the planner",
    Not: "a combinator: three-valued not3 in the planner",
}


def factor(node: Expr, layout: Layout) -> tuple[tuple[AxisPred, ...], ...] | None:
    """A per-axis primitive as one tuple of 1-D predicates per axis (``()`` = all allowed), or
    ``None`` when ``node`` is not per-axis (see :data:`FACTOR` and :data:`FACTOR_LEAVES_OUT`)."""
    rule = FACTOR.get(type(node))
    out: list[list[AxisPred]] = [[] for _ in range(layout.rank)]
    if rule is None or not rule(node, layout, out):
        return None
    return tuple(tuple(p) for p in out)


def axis_class(preds: tuple[AxisPred, ...], qg, qlo, qhi, kg, klo, khi, dil: int,
               chunk: int = 1 << 22) -> np.ndarray:
    """Exact class of a conjunction of 1-D predicates on one axis (broadcast arrays)."""
    qg, qlo, qhi, kg, klo, khi = np.broadcast_arrays(qg, qlo, qhi, kg, klo, khi)
    if not preds:
        return np.full(qg.shape, FULL, dtype=np.int8)
    c = and3([p.classify(qg, qlo, qhi, kg, klo, khi, dil) for p in preds])
    todo = np.nonzero(c == UNKNOWN)
    if len(todo[0]):
        c[todo] = _axis_elements(preds, qg[todo], qlo[todo], qhi[todo], kg[todo], klo[todo],
                                 khi[todo], dil, chunk)
    return c


def _axis_elements(preds, qg, qlo, qhi, kg, klo, khi, dil, chunk):
    """Settle undecided 1-D cases by evaluating the axis' coordinates (tiny: extent x extent)."""
    out = np.empty(len(qg), dtype=np.int8)
    eq = int((qhi - qlo).max()) + 1
    ek = int((khi - klo).max()) + 1
    step = max(1, chunk // (eq * ek))
    jq, jk = np.arange(eq), np.arange(ek)
    for s in range(0, len(qg), step):
        sl = slice(s, s + step)
        qc = qg[sl, None] + dil * np.minimum(qlo[sl, None] + jq, qhi[sl, None])
        kc = kg[sl, None] + dil * np.minimum(klo[sl, None] + jk, khi[sl, None])
        ok = np.ones((len(qc), eq, ek), dtype=bool)
        for p in preds:
            ok &= p.allowed(qc[:, :, None], kc[:, None, :])
        # Clamped duplicates repeat real coordinates, so any/all stay exact.
        out[sl] = np.where(ok.all((1, 2)), FULL, np.where(ok.any((1, 2)), PARTIAL, EMPTY))
    return out


__all__ = ["EMPTY", "PARTIAL", "FULL", "UNKNOWN", "AxisKind", "FACTOR", "FACTOR_LEAVES_OUT", "and3", "or3", "not3", "union_class", "Band",
           "band_class", "AxisPred", "factor", "axis_class"]
