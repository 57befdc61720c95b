"""Pass 2, tiles: the geometry of one plan (ordering, both sides' tiles as token sets) that the
later passes share, in :class:`Ctx`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from attnlang.errors import AttnError
from attnlang.inputs import check_inputs as _check_inputs
from attnlang.order import Ordering, TileSet
from attnlang.pattern import Layout, Pattern


# Planning memory budget. A plan that would need more is refused with an AttnError before any
# big allocation (never a raw MemoryError): tile pairs listed one by one cost about
# BYTES_PER_PAIR at peak (keys, sort, classes), interval rows about BYTES_PER_ROW per query tile.
BLOCK_SIZES = (16, 32, 64, 128, 256)  # tile sizes (tokens) the kernels' tl.dot blocks take
PLAN_BYTES = 4 << 30
BYTES_PER_PAIR = 64
BYTES_PER_ROW = 256


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


def check_pairs(count: int, ctx: Ctx) -> None:
    """Refuse, before allocating them, more candidate tile pairs than PLAN_BYTES allows."""
    if count * BYTES_PER_PAIR > PLAN_BYTES:
        raise AttnError(
            f"planning this pattern lists {count:,} tile pairs of {ctx.Q.block} x {ctx.K.block} tokens "
            f"(about {count * BYTES_PER_PAIR / 2**30:.0f} GiB; the planning budget is "
            f"{PLAN_BYTES / 2**30:.0f} GiB): too large at N = {ctx.layout.n}",
            hint="use larger tiles (schedule tile(q = 128, kv = 128) or block_m/block_n up to 256) "
                 "or a smaller N; bands, windows and blocks in natural order plan in O(query tiles) "
                 "(see docs/simulator.md, planning memory)")


def check_rows(n_kernel: int, bm: int, bn: int) -> None:
    """Refuse sizes whose per-tile arrays alone exceed PLAN_BYTES (or int32 tile indices)."""
    tiles = -(-n_kernel // min(bm, bn))
    if tiles * BYTES_PER_ROW > PLAN_BYTES or n_kernel >= 2 ** 31:
        raise AttnError(
            f"N = {n_kernel} tokens in tiles of {min(bm, bn)} is {tiles:,} tiles per side: too large to plan "
            f"(at most {min(PLAN_BYTES // BYTES_PER_ROW, (2 ** 31 - 1) // min(bm, bn)):,} tiles and 2^31 - 1 "
            "tokens)", hint="use larger tiles (up to 256 tokens) or a smaller N")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

# Checked once, at make_plan, by attnlang.inputs (ids [N] and a 0-d length, int64); these only read.
def input_ids(inputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(inputs[name]).reshape(-1).astype(np.int64)


def input_length(inputs: Mapping[str, np.ndarray], name: str) -> int:
    return int(np.asarray(inputs[name]).reshape(()))


def check_inputs(pattern: Pattern, inputs: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """One batch item's runtime inputs, checked by the one input check (attnlang.inputs)."""
    return _check_inputs(pattern, inputs, item=True)
