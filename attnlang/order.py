"""Token orders and tiles as token sets.

The kernel runs over *positions*; an :class:`Ordering` maps positions to tokens and groups them
into tiles. Either the natural order (a tile is a flat index interval), or a *box order*: every
axis is split into dilation groups (``x -> (x % d, x // d)``, NATTEN's trick that makes dilated
neighborhoods block-sparse), each group padded to a multiple of the box, and the grid of boxes is
walked in ``tiled`` (row-major), ``morton``, ``hilbert`` or ``rcm`` order; tokens inside a box are
row-major. The query box and the key box may differ when one nests in the other on every axis:
the smaller boxes are then row-major inside the larger one, so both stay contiguous.

    >>> from attnlang.pattern import Layout
    >>> o = Ordering.boxed(Layout.of((4, 4)), (2, 2), (2, 2))
    >>> o.positions()[:8].tolist()   # the first two 2x2 boxes
    [0, 1, 4, 5, 2, 3, 6, 7]

A :class:`TileSet` describes one side's tiles (queries or keys) as unions of *pieces*; a piece is
a product over axes of arithmetic progressions ``{g + d * x' : lo <= x' <= hi}`` (``d`` the axis'
dilation grouping, 1 = plain interval). Box tiles are one piece; a flat interval of a
multi-dimensional grid is at most ``2 * rank - 1`` row-major boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from attnlang.pattern import Layout


@dataclass(frozen=True)
class TileSet:
    """The tiles of one side in kernel order, as unions of per-axis progressions (pieces)."""

    block: int  # positions per tile
    g: np.ndarray  # int64 [T, P, rank]: dilation group of each piece, per axis
    lo: np.ndarray  # int64 [T, P, rank]: first in-group coordinate (inclusive)
    hi: np.ndarray  # int64 [T, P, rank]: last in-group coordinate (inclusive)
    pvalid: np.ndarray  # bool [T, P]: the piece exists (holds at least one token)
    nvalid: np.ndarray  # int64 [T]: tokens in the tile (the rest are padding / ragged tail)
    grid: np.ndarray | None  # int64 [T, rank]: box-grid coordinates (box orders only)

    @property
    def count(self) -> int:
        return len(self.nvalid)

    @property
    def complete(self) -> np.ndarray:
        return self.nvalid == self.block


@dataclass(frozen=True)
class Ordering:
    """Kernel position -> token: natural, or boxes of the dilation-grouped, padded grid."""

    layout: Layout
    name: str  # natural | tiled | morton | hilbert | rcm
    box_q: tuple[int, ...] | None = None  # None: natural order (flat tiles)
    box_kv: tuple[int, ...] | None = None
    dil: tuple[int, ...] = ()  # per-axis dilation grouping (1 = none)
    seq: np.ndarray | None = None  # kernel big-box index -> ravelled big-box grid coordinate

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def natural(layout: Layout) -> "Ordering":
        return Ordering(layout, "natural", dil=(1,) * layout.rank)

    @staticmethod
    def boxed(layout: Layout, box_q: tuple[int, ...], box_kv: tuple[int, ...],
              dil: tuple[int, ...] | None = None, name: str = "tiled",
              seq: np.ndarray | None = None) -> "Ordering":
        """Box order; ``seq`` (a permutation of the big boxes) overrides ``name``'s curve."""
        dil = dil or (1,) * layout.rank
        o = Ordering(layout, name, tuple(box_q), tuple(box_kv), tuple(dil))
        if seq is None:
            seq = curve_order(name if name in CURVES else "tiled", o.box_grid)
        return Ordering(layout, name, o.box_q, o.box_kv, o.dil, np.asarray(seq, dtype=np.int64))

    # -- geometry ----------------------------------------------------------------------------
    @property
    def is_natural(self) -> bool:
        return self.box_q is None

    @property
    def big(self) -> tuple[int, ...]:
        return tuple(max(a, b) for a, b in zip(self.box_q, self.box_kv))

    @property
    def group_len(self) -> tuple[int, ...]:
        """Padded length of one dilation group per axis (a multiple of the big box)."""
        return tuple(-(-(-(-L // d)) // B) * B for L, d, B in zip(self.layout.sizes, self.dil, self.big))

    @property
    def axis_len(self) -> tuple[int, ...]:
        """Length of each grouped, padded axis (``dil * group_len``)."""
        return tuple(d * P for d, P in zip(self.dil, self.group_len))

    @property
    def box_grid(self) -> tuple[int, ...]:
        return tuple(U // B for U, B in zip(self.axis_len, self.big))

    @property
    def n_kernel(self) -> int:
        return self.layout.n if self.is_natural else math.prod(self.axis_len)

    def box(self, side: str) -> tuple[int, ...] | None:
        return self.box_q if side == "q" else self.box_kv

    # -- positions ---------------------------------------------------------------------------
    def positions(self) -> np.ndarray | None:
        """Kernel position -> token index (``-1`` = padding); ``None`` for the natural order."""
        if self.is_natural:
            return None
        return self.tokens_at(np.arange(self.n_kernel, dtype=np.int64))

    def tokens_at(self, pos: np.ndarray) -> np.ndarray:
        """Token index of kernel positions (``-1`` for padding or positions past the end)."""
        pos = np.asarray(pos, dtype=np.int64)
        if self.is_natural:
            return np.where(pos < self.layout.n, pos, -1)
        u = self._u_of_pos(pos)
        flat = np.zeros_like(pos)
        ok = np.ones(pos.shape, dtype=bool)
        for a, (L, d, P) in enumerate(zip(self.layout.sizes, self.dil, self.group_len)):
            x = u[a] // P + d * (u[a] % P)
            ok &= x < L
            flat = flat * L + np.minimum(x, L - 1)
        return np.where(ok & (pos < self.n_kernel), flat, -1)

    def _u_of_pos(self, pos: np.ndarray) -> list[np.ndarray]:
        """Grouped-grid coordinates of kernel positions (box orders)."""
        big, small = self.big, tuple(min(a, b) for a, b in zip(self.box_q, self.box_kv))
        vb, vs = math.prod(big), math.prod(small)
        bidx, within = np.divmod(pos, vb)
        sidx, inner = np.divmod(within, vs)
        bc = np.unravel_index(self.seq[np.minimum(bidx, len(self.seq) - 1)], self.box_grid)
        sc = np.unravel_index(sidx, tuple(B // s for B, s in zip(big, small)))
        ic = np.unravel_index(inner, small)
        return [bc[a] * big[a] + sc[a] * small[a] + ic[a] for a in range(self.layout.rank)]

    # -- tiles -------------------------------------------------------------------------------
    def tiles(self, side: str, block: int) -> TileSet:
        """The tiles of one side (``"q"`` or ``"kv"``) of ``block`` positions each."""
        if self.is_natural:
            return _natural_tiles(self.layout, block)
        box = self.box(side)
        assert math.prod(box) == block
        n_t = self.n_kernel // block
        origin = np.stack(self._u_of_pos(np.arange(n_t, dtype=np.int64) * block), axis=-1)
        rank = self.layout.rank
        P = np.asarray(self.group_len)
        d = np.asarray(self.dil)
        L = np.asarray(self.layout.sizes)
        g = origin // P
        lo = origin % P
        hi_full = lo + np.asarray(box) - 1
        lg = (L - g + d - 1) // d  # in-group length of group g
        hi = np.minimum(hi_full, lg - 1)
        valid = (lo <= hi).all(axis=-1)
        nvalid = np.where(valid, np.prod(np.maximum(hi - lo + 1, 0), axis=-1), 0)
        grid = origin // np.asarray(box)
        return TileSet(block, g[:, None, :], lo[:, None, :], hi[:, None, :], valid[:, None],
                       nvalid.astype(np.int64), grid.reshape(n_t, rank))

    def grid_lookup(self, side: str) -> np.ndarray:
        """Ravelled box-grid coordinate (in units of the side's box) -> tile index."""
        box = self.box(side)
        block = math.prod(box)
        n_t = self.n_kernel // block
        origin = np.stack(self._u_of_pos(np.arange(n_t, dtype=np.int64) * block), axis=-1)
        shape = tuple(U // b for U, b in zip(self.axis_len, box))
        out = np.empty(math.prod(shape), dtype=np.int64)
        out[np.ravel_multi_index(tuple((origin // np.asarray(box)).T), shape)] = np.arange(n_t)
        return out


def _natural_tiles(layout: Layout, block: int) -> TileSet:
    n, rank = layout.n, layout.rank
    n_t = -(-n // block)
    starts = np.arange(n_t, dtype=np.int64) * block
    ends = np.minimum(starts + block, n) - 1
    nvalid = ends - starts + 1
    if rank == 1:
        g = np.zeros((n_t, 1, 1), dtype=np.int64)
        return TileSet(block, g, starts[:, None, None], ends[:, None, None],
                       np.ones((n_t, 1), dtype=bool), nvalid, None)
    pieces = [_interval_boxes(int(s), int(e), layout.sizes) for s, e in zip(starts, ends)]
    P = 2 * rank - 1
    lo = np.zeros((n_t, P, rank), dtype=np.int64)
    hi = np.full((n_t, P, rank), -1, dtype=np.int64)
    pvalid = np.zeros((n_t, P), dtype=bool)
    for t, ps in enumerate(pieces):
        for j, (plo, phi) in enumerate(ps):
            lo[t, j], hi[t, j], pvalid[t, j] = plo, phi, True
    return TileSet(block, np.zeros_like(lo), lo, hi, pvalid, nvalid, None)


def _interval_boxes(s: int, e: int, sizes: tuple[int, ...]) -> list[tuple[tuple, tuple]]:
    """The flat interval ``[s, e]`` of a row-major grid as at most ``2 * rank - 1`` boxes."""
    if len(sizes) == 1:
        return [((s,), (e,))]
    inner = math.prod(sizes[1:])
    full = ((0,) * (len(sizes) - 1), tuple(x - 1 for x in sizes[1:]))
    r0, rs = divmod(s, inner)
    r1, re = divmod(e, inner)
    if r0 == r1:
        return [((r0,) + a, (r0,) + b) for a, b in _interval_boxes(rs, re, sizes[1:])]
    out = []
    first, last = r0, r1
    if rs != 0:
        out += [((r0,) + a, (r0,) + b) for a, b in _interval_boxes(rs, inner - 1, sizes[1:])]
        first = r0 + 1
    if re != inner - 1:
        out += [((r1,) + a, (r1,) + b) for a, b in _interval_boxes(0, re, sizes[1:])]
        last = r1 - 1
    if first <= last:
        out.append(((first,) + full[0], (last,) + full[1]))
    return out


# --------------------------------------------------------------------------------------------
# Curves over the grid of boxes
# --------------------------------------------------------------------------------------------

def _tiled(coords: np.ndarray, bits: int) -> np.ndarray:
    return np.zeros(len(coords), dtype=np.int64)  # stable argsort keeps row-major order


def _morton(coords: np.ndarray, bits: int) -> np.ndarray:
    key = np.zeros(len(coords), dtype=np.int64)
    for b in range(bits - 1, -1, -1):
        for i in range(coords.shape[1]):
            key = (key << 1) | ((coords[:, i] >> b) & 1)
    return key


def _hilbert(coords: np.ndarray, bits: int) -> np.ndarray:
    """Hilbert index of n-D points (Skilling, "Programming the Hilbert curve", 2004)."""
    X = [coords[:, i].copy() for i in range(coords.shape[1])]
    n = len(X)
    if n == 1:
        return X[0]
    M = 1 << (bits - 1)
    Q = M
    while Q > 1:  # inverse undo excess work
        P = Q - 1
        for i in range(n):
            cond = (X[i] & Q) != 0
            X[0] = np.where(cond, X[0] ^ P, X[0])
            t = np.where(cond, 0, (X[0] ^ X[i]) & P)
            X[0] = X[0] ^ t
            X[i] = X[i] ^ t
        Q >>= 1
    for i in range(1, n):  # Gray encode
        X[i] = X[i] ^ X[i - 1]
    t = np.zeros_like(X[0])
    Q = M
    while Q > 1:
        t = np.where((X[n - 1] & Q) != 0, t ^ (Q - 1), t)
        Q >>= 1
    X = [x ^ t for x in X]
    key = np.zeros(len(coords), dtype=np.int64)
    for b in range(bits - 1, -1, -1):
        for i in range(n):
            key = (key << 1) | ((X[i] >> b) & 1)
    return key


CURVES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "tiled": _tiled, "morton": _morton, "hilbert": _hilbert,
}


def curve_order(name: str, grid: tuple[int, ...]) -> np.ndarray:
    """Ravelled grid coordinates in the order the named curve walks the grid."""
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), axis=-1).astype(np.int64)
    bits = max(1, max(int(g - 1).bit_length() for g in grid))
    return np.argsort(CURVES[name](coords, bits), kind="stable")


def rcm_order(n_boxes: int, edges: np.ndarray) -> np.ndarray:
    """Reverse Cuthill-McKee order of boxes joined by ``edges`` ``[m, 2]`` (a bandwidth-reducing
    relabelling: boxes that attend to each other end up close in kernel order)."""
    import networkx as nx  # function-level: import cost, only the rcm order needs it

    graph = nx.Graph()
    graph.add_nodes_from(range(n_boxes))
    graph.add_edges_from((int(a), int(b)) for a, b in edges if a != b)
    return np.asarray(list(nx.utils.reverse_cuthill_mckee_ordering(graph)), dtype=np.int64)


__all__ = ["Ordering", "TileSet", "curve_order", "rcm_order", "CURVES"]
