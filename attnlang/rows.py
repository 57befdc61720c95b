"""How the CPU ``torch`` executor walks one head group's tiles: rows, windows, order, chunks.

Numpy only, and the single place these decisions are made: ``runtime/tiles.py`` builds its
tensors from a :class:`RowLayout` and ``runtime/torch_exec.py`` cuts chunks with
:func:`chunks`, while the simulator's CPU model (:func:`attnlang.simulate.pass_work`) prices the
very same layout without building any tensor. Decisions, per head group:

* each query tile is a *row* of slots: its full key tiles, then its partial ones; ragged rows
  are padded with dummy slots (an all ``-inf`` bias);
* *uneven* rows (the widest over twice the median: global tokens, sinks, documents) are sorted
  widest first, so a chunk of rows pads to its own widest row instead of the group's;
* otherwise, when every row's key tiles lie within ``width`` consecutive tiles (bands, blocks,
  windows), rows become *windows* ``start + 0..width``: keys are then read as a strided view
  (no gather) wherever consecutive windows are evenly spaced;
* rows are processed in chunks of about ``CHUNK_BYTES`` of fp32 scores (one fused call each).

>>> from attnlang.plan import BlockTable
>>> import numpy as np
>>> full = BlockTable.from_dense(np.tril(np.ones((4, 4), dtype=bool), -1))
>>> part = BlockTable.from_dense(np.eye(4, dtype=bool))
>>> lay = row_layout(full, part)
>>> lay.width, lay.window_start is not None, lay.masked(0, 2)
(4, True, True)
>>> chunks(lay, heads=8, bm=64, bn=64, chunk_bytes=1 << 20)  # 8 heads x 64 x 4 x 64 fp32 per row
[(0, 2), (2, 4)]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnlang.plan import BlockTable

CHUNK_BYTES = 4 << 20  # fp32 scores per chunk of query tiles (bounds memory; 4 MiB measured best)


@dataclass(frozen=True)
class RowLayout:
    """One head group's query-tile rows in the order the executor processes them."""

    widths: np.ndarray  # int64 [q_tiles]: visited key tiles per row (executor order)
    partial: np.ndarray  # int64 [q_tiles]: partial key tiles per row (executor order)
    width: int  # slots of the widest row (at least 1)
    window_start: np.ndarray | None  # int64 [q_tiles]: rows are windows start + 0..width, or None
    q_perm: np.ndarray | None  # executor row -> plan query tile (widest first), or None

    def chunk_width(self, c0: int, c1: int) -> int:
        """Slots rows ``c0..c1`` need: their widest row when sorted, else the group's width."""
        if self.q_perm is None:
            return self.width
        return max(int(self.widths[c0:c1].max(initial=0)), 1)

    def window_step(self, c0: int, c1: int) -> int | None:
        """The constant tile step between the windows of rows ``c0..c1`` (keys as a strided
        view), or None when the chunk's keys must be gathered."""
        if self.window_start is None:
            return None
        st = self.window_start[c0:c1]
        if len(st) == 1:
            return 0
        d = np.diff(st)
        return int(d[0]) if d[0] >= 0 and np.all(d == d[0]) else None

    def masked(self, c0: int, c1: int) -> bool:
        """Whether rows ``c0..c1`` need a bias: a partial tile or a dummy slot in the chunk."""
        w = self.chunk_width(c0, c1)
        return bool((self.partial[c0:c1] > 0).any() or (self.widths[c0:c1] < w).any())


def row_layout(full: BlockTable, partial: BlockTable) -> RowLayout:
    """The executor's layout of a head group with tables ``full`` and ``partial`` (O(nnz))."""
    nq, nk = full.rows, full.cols
    fcount, pcount = full.counts(), partial.counts()
    widths = (fcount + pcount).astype(np.int64)
    width = max(int(widths.max(initial=0)), 1)
    # Uneven rows: a window as wide as the widest row would make every row that wide.
    uneven = width > 2 * max(1, int(np.median(widths))) if nq else False
    if uneven:
        q_perm = np.argsort(-widths, kind="stable")
        return RowLayout(widths[q_perm], pcount[q_perm].astype(np.int64), width, None, q_perm)
    start = None
    if nk >= width:
        first = lambda t: np.where(t.counts() > 0, t.first(), nk)  # noqa: E731
        lo = np.minimum(first(full), first(partial))
        hi = np.maximum(full.last(), partial.last())
        seen = widths > 0
        if np.all((hi - lo < width) | ~seen):
            start = np.minimum(np.where(seen, lo, 0), nk - width).astype(np.int64)
    return RowLayout(widths, pcount.astype(np.int64), width, start, None)


def dense_layout(q_tiles: int, kv_tiles: int) -> RowLayout:
    """The layout of the dense pattern: every row is every key tile, all full (one window)."""
    return RowLayout(np.full(q_tiles, kv_tiles, dtype=np.int64), np.zeros(q_tiles, dtype=np.int64),
                     max(kv_tiles, 1), np.zeros(q_tiles, dtype=np.int64), None)


def chunks(layout: RowLayout, heads: int, bm: int, bn: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Row chunks ``(c0, c1)`` of about ``chunk_bytes`` of fp32 scores for ``heads`` query heads.

    Small chunks keep the fused kernel's K/V windows and bias in cache (measured: one chunk per
    head group is 2-3x slower on an idle machine). Sorted layouts size each chunk by its first
    (widest) row.
    """
    out, c0, nq = [], 0, len(layout.widths)
    while c0 < nq:
        per_row = heads * bm * layout.chunk_width(c0, c0 + 1) * bn * 4
        c1 = min(nq, c0 + max(1, chunk_bytes // max(per_row, 1)))
        out.append((c0, c1))
        c0 = c1
    return out


__all__ = ["CHUNK_BYTES", "RowLayout", "chunks", "dense_layout", "row_layout"]
