"""The Plan IR: which key tiles each query tile visits, and which of them need no mask.

A :class:`Plan` is how a pattern runs, never what it means: it refers to its
:class:`~attnlang.pattern.Pattern` for the predicate of partial tiles and adds

* the tile sizes ``block_m`` x ``block_n`` (tokens per query / key tile, in kernel order) and the
  tile *boxes* on the token grid they come from;
* the token order the kernel runs in (``order``: kernel position -> token index, ``-1`` for
  padding; ``None`` = natural order, no padding);
* per head group, CSR tables of the partial and full key tiles of every query tile, and their
  transposes (query tiles per key tile) for the backward pass;
* optionally the planner's analytic form (closed-form key-tile ranges) for codegen.

``Plan.from_mask`` builds a plan from a dense mask: it is O(N²), the oracle the fast planner
(:mod:`attnlang.planner`) is tested against and the fallback for tiny problems.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Iterator

import numpy as np

from attnlang.pattern import Pattern

class TileClass(IntEnum):
    """What a (query tile, key tile) pair is: stored as int8 in class arrays, so members are ints.

    ``UNKNOWN`` is the planner's fourth value for what its interval rules cannot decide (settled
    per element before a plan is built); a :class:`Plan` only ever holds the first three.
    """

    EMPTY = 0  # no allowed pair: skipped
    PARTIAL = 1  # some allowed pairs: visited with the mask
    FULL = 2  # every pair allowed: visited without the mask
    UNKNOWN = 3


EMPTY, PARTIAL, FULL, UNKNOWN = TileClass


@dataclass(frozen=True, eq=False)
class BlockTable:
    """CSR table: row ``i`` (a query tile, or a key tile when transposed) lists tile indices.

    Three representations behind one interface, so memory follows the structure of the rows:

    * explicit: ``stored`` holds the indices (O(entries));
    * ranges: ``ranges = (lo, hi)``, each ``int64 [rows, R]``, row ``i`` is the union of the
      sorted disjoint half-open ranges ``lo[i, j] <= t < hi[i, j]`` (O(rows): band-shaped rows
      such as a causal plan's ``0..qt``);
    * transposed: ``source`` is a table whose transpose this is; the counts are exact and cheap,
      the indices are built on first use.

    ``indices`` materialises the explicit form on demand (O(entries)) and caches it; ``counts``,
    ``nnz``, ``row``, ``first``/``last``, ``transpose`` of a range table never do.
    """

    indptr: np.ndarray  # int64 [rows + 1]
    stored: np.ndarray | None  # int32 [nnz] sorted within each row, or None until materialised
    cols: int  # number of possible column tiles
    ranges: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    source: "BlockTable | None" = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def materialised(self) -> bool:
        """Whether the explicit index array exists (O(entries) memory)."""
        return self.stored is not None

    @property
    def indices(self) -> np.ndarray:
        """int32 ``[nnz]``, sorted within each row (built on first use from ranges/transposes)."""
        if self.stored is None:
            if self.ranges is not None:
                idx = _expand_ranges(*self.ranges)
            else:
                idx = self.source._explicit_transpose().stored
            object.__setattr__(self, "stored", idx)
        return self.stored

    def row(self, i: int) -> np.ndarray:
        if self.stored is None and self.ranges is not None:
            lo, hi = self.ranges
            return np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in zip(lo[i], hi[i])])
        return self.indices[self.indptr[i]:self.indptr[i + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def first(self) -> np.ndarray:
        """Smallest tile index of each row; -1 for an empty row."""
        if self.stored is None and self.ranges is not None:
            lo, hi = self.ranges
            ok = hi > lo
            j = np.argmax(ok, axis=1)
            v = lo[np.arange(len(lo)), j]
            return np.where(ok.any(1), v, -1).astype(np.int64)
        return _row_reduce(self, np.minimum, -1)

    def last(self) -> np.ndarray:
        """Largest tile index of each row; -1 for an empty row."""
        if self.stored is None and self.ranges is not None:
            lo, hi = self.ranges
            ok = hi > lo
            j = lo.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
            v = hi[np.arange(len(hi)), j] - 1
            return np.where(ok.any(1), v, -1).astype(np.int64)
        return _row_reduce(self, np.maximum, -1)

    def to_dense(self) -> np.ndarray:
        """bool ``[rows, cols]``: which tiles each row lists (O(rows x cols) by construction)."""
        out = np.zeros((self.rows, self.cols), dtype=bool)
        if self.stored is None and self.ranges is not None:
            cols = np.arange(self.cols, dtype=np.int64)
            for lo, hi in zip(self.ranges[0].T, self.ranges[1].T):
                out |= (cols >= lo[:, None]) & (cols < hi[:, None])
        else:
            out[np.repeat(np.arange(self.rows), self.counts()), self.indices] = True
        return out

    def transpose(self) -> "BlockTable":
        """The transposed table: ranges again where possible, else exact counts now and the
        indices on first use (only the backward pass's consumers read them)."""
        if self.ranges is not None:
            return _transpose_ranges(self)
        counts = np.bincount(self.indices, minlength=self.cols)
        indptr = np.zeros(self.cols + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return BlockTable(indptr, None, self.rows, None, self)

    def _explicit_transpose(self) -> "BlockTable":
        rows = np.repeat(np.arange(self.rows, dtype=np.int64), self.counts())
        return BlockTable.from_pairs(self.indices.astype(np.int64), rows, self.cols, self.rows)

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """FlexAttention-style ``(num_blocks [rows], indices [rows, max])`` padded with 0."""
        counts = self.counts().astype(np.int32)
        width = max(int(counts.max(initial=0)), 1)
        dense = np.zeros((self.rows, width), dtype=np.int32)
        mask = np.arange(width)[None, :] < counts[:, None]
        dense[mask] = self.indices
        return counts, dense

    @staticmethod
    def from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> "BlockTable":
        """Build from (row, col) pairs (any order, no duplicates)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        key = np.lexsort((cols, rows))
        rows, cols = rows[key], cols[key]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        return BlockTable(np.cumsum(indptr), cols.astype(np.int32), n_cols)

    @staticmethod
    def from_dense(m: np.ndarray) -> "BlockTable":
        r, c = np.nonzero(m)
        return BlockTable.from_pairs(r, c, m.shape[0], m.shape[1])

    @staticmethod
    def from_ranges(lo: np.ndarray, hi: np.ndarray, cols: int) -> "BlockTable":
        """Rows as unions of ``R`` sorted, disjoint half-open ranges (``lo, hi``: ``[rows, R]``;
        a range with ``hi <= lo`` is empty). O(rows) memory whatever the ranges' lengths."""
        lo = np.asarray(lo, dtype=np.int64)
        lo = lo[:, None] if lo.ndim == 1 else lo
        hi = np.asarray(hi, dtype=np.int64).reshape(lo.shape)
        hi = np.maximum(hi, lo)
        indptr = np.zeros(len(lo) + 1, dtype=np.int64)
        np.cumsum((hi - lo).sum(1), out=indptr[1:])
        return BlockTable(indptr, None, cols, (lo, hi))


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The explicit indices of a range table (rows in order, ranges in order)."""
    starts, lens = lo.reshape(-1), (hi - lo).reshape(-1)
    total = int(lens.sum())
    offs = np.cumsum(lens) - lens
    return (np.arange(total, dtype=np.int64) - np.repeat(offs - starts, lens)).astype(np.int32)


def _transpose_ranges(t: BlockTable) -> BlockTable:
    """Transpose of a range table: ranges again when every range column is monotone in the row
    (bands: a column's rows are then one range per column), else exact counts with the indices
    built on first use. Both O(rows + cols)."""
    lo, hi = t.ranges
    # An empty range may sit anywhere: park it where the previous ranges of its column end.
    full = hi > lo
    park = np.maximum.accumulate(np.where(full, hi, 0), axis=0)
    lo, hi = np.where(full, lo, park), np.where(full, hi, park)
    c = np.arange(t.cols, dtype=np.int64)
    if len(lo) and np.all(np.diff(lo, axis=0) >= 0) and np.all(np.diff(hi, axis=0) >= 0):
        # Rows containing column c in range j: those with lo <= c < hi, contiguous by monotony.
        tlo = np.stack([np.searchsorted(hi[:, j], c, side="right") for j in range(lo.shape[1])], 1)
        thi = np.stack([np.searchsorted(lo[:, j], c, side="right") for j in range(lo.shape[1])], 1)
        thi = np.maximum(thi, tlo)
        order = np.argsort(np.where(thi > tlo, tlo, np.iinfo(np.int64).max), axis=1, kind="stable")
        return BlockTable.from_ranges(np.take_along_axis(tlo, order, 1), np.take_along_axis(thi, order, 1), t.rows)
    counts = np.zeros(t.cols, dtype=np.int64)
    for j in range(lo.shape[1]):  # rows with lo <= c minus rows with hi <= c
        counts += np.searchsorted(np.sort(lo[:, j]), c, side="right")
        counts -= np.searchsorted(np.sort(hi[:, j]), c, side="right")
    indptr = np.zeros(t.cols + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return BlockTable(indptr, None, t.rows, None, t)


def _row_reduce(t: BlockTable, op, empty: int) -> np.ndarray:
    """``op`` (np.minimum / np.maximum) over each row's tile indices; ``empty`` for empty rows."""
    out = np.full(t.rows, empty, dtype=np.int64)
    has = t.counts() > 0
    if has.any():
        out[has] = op.reduceat(t.indices.astype(np.int64), t.indptr[:-1][has])
    return out


@dataclass(frozen=True)
class TileRange:
    """Closed-form key tiles of query tile ``qt`` (sympy expressions in the symbol ``qt``).

    The tile visits key tiles ``lo <= kt < hi``; those with ``full_lo <= kt < full_hi`` need no
    mask (an empty full range has ``full_lo >= full_hi``). Equal to the tables by construction;
    codegen turns it into loop bounds so the kernel reads no index tensors.
    """

    lo: Any
    hi: Any
    full_lo: Any
    full_hi: Any


@dataclass(frozen=True)
class HeadGroup:
    """The tables shared by query heads ``lo..hi`` (``hi=None``: every head)."""

    lo: int
    hi: int | None
    partial: BlockTable  # per query tile: key tiles that need the mask
    full: BlockTable  # per query tile: key tiles entirely allowed (no mask work)
    partial_t: BlockTable  # per key tile: query tiles (backward dK/dV)
    full_t: BlockTable
    # A TileRange, or a zero-argument function deriving one (sympy costs milliseconds and only
    # codegen reads it, so the planner defers it); None when the plan has no closed form.
    closed_form: Callable[[], TileRange | None] | TileRange | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def analytic(self) -> TileRange | None:
        """Closed-form key-tile ranges of this group, derived on first use; None if tabulated."""
        cf = self.closed_form
        return cf() if callable(cf) else cf

    @staticmethod
    def of(lo: int, hi: int | None, partial: BlockTable, full: BlockTable,
           analytic: Callable[[], TileRange | None] | TileRange | None = None) -> "HeadGroup":
        return HeadGroup(lo, hi, partial, full, partial.transpose(), full.transpose(), analytic)


@dataclass(frozen=True)
class Plan:
    """A tile schedule for one pattern (and, for runtime inputs, one batch item)."""

    pattern: Pattern
    block_m: int  # query tile size in tokens (kernel order)
    block_n: int  # key tile size in tokens
    tile_q: tuple[int, ...]  # query tile box on the token grid
    tile_kv: tuple[int, ...]  # key tile box on the token grid
    order: np.ndarray | None  # kernel position -> token index (-1 = padding); None = natural
    groups: tuple[HeadGroup, ...]
    notes: tuple[str, ...] = ()  # why the planner chose what it chose
    allowed_pairs: tuple[int, ...] | None = field(default=None)  # per group, when known
    # pyramid(...) plans: int [Hq, query groups, key blocks], the level of each (group, block)
    # pair (0 = skipped), i.e. the (query tile, key block, level) list of docs/language.md §13.2
    levels: np.ndarray | None = field(default=None, compare=False, repr=False)

    # -- shape ------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.pattern.n

    @property
    def n_kernel(self) -> int:
        """Sequence length the kernel runs over (>= N when the order pads)."""
        return self.n if self.order is None else len(self.order)

    @property
    def q_tiles(self) -> int:
        return -(-self.n_kernel // self.block_m)

    @property
    def kv_tiles(self) -> int:
        return -(-self.n_kernel // self.block_n)

    def group_for_head(self, head: int) -> HeadGroup:
        for g in self.groups:
            if g.hi is None or g.lo <= head < g.hi:
                return g
        raise IndexError(f"head {head} is in no head group of this plan")

    # -- views ------------------------------------------------------------------------------
    def tile_map(self, head: int = 0) -> np.ndarray:
        """int8 ``[q_tiles, kv_tiles]``: 0 empty, 1 partial, 2 full."""
        g = self.group_for_head(head)
        m = np.zeros((self.q_tiles, self.kv_tiles), dtype=np.int8)
        for table, val in ((g.partial, PARTIAL), (g.full, FULL)):
            m[table.to_dense()] = val
        return m

    def tile_cells(self, head: int, rows: int, cols: int) -> np.ndarray:
        """int8 ``[rows, cols]``: the tile map downsampled to at most ``rows x cols`` cells,
        each the strongest class among the tiles it covers (``tile_map`` when it is that small).

        Built from the tables without the dense map: O(query tiles + cells) for range rows,
        O(visited tiles) otherwise, never O(q_tiles x kv_tiles).
        """
        visited, full = self.tile_counts(head, *cell_factors(self.q_tiles, self.kv_tiles, rows, cols))
        return np.where(full > 0, FULL, np.where(visited > 0, PARTIAL, EMPTY)).astype(np.int8)

    def tile_counts(self, head: int, fr: int, fc: int) -> tuple[np.ndarray, np.ndarray]:
        """``(visited, full)`` tiles in each cell of ``fr x fc`` tiles (int64 ``[cells, cells]``):
        a downsampled tile map that still tells "all full" and "all empty" cells apart."""
        g = self.group_for_head(head)
        shape = (-(-self.q_tiles // fr), -(-self.kv_tiles // fc))
        part, full = _count_cells(g.partial, fr, fc, shape), _count_cells(g.full, fr, fc, shape)
        return part + full, full

    def stats(self, head: int = 0) -> dict[str, Any]:
        """Visited/partial/full tile counts, density and the tile bound for one head."""
        g = self.group_for_head(head)
        partial, fullc = g.partial.nnz, g.full.nnz
        visited = partial + fullc
        dense = self.q_tiles * self.kv_tiles
        out: dict[str, Any] = {
            "n": self.n, "n_kernel": self.n_kernel, "block_m": self.block_m, "block_n": self.block_n,
            "tile_q": list(self.tile_q), "tile_kv": list(self.tile_kv),
            "q_tiles": self.q_tiles, "kv_tiles": self.kv_tiles,
            "visited": visited, "partial": partial, "full": fullc,
            "tile_density": visited / dense if dense else 0.0,
            "tile_bound": dense / visited if visited else float("inf"),
        }
        if self.allowed_pairs is not None:
            pairs = self.allowed_pairs[self.groups.index(g)]
            out["allowed_pairs"] = pairs
            out["density"] = pairs / (self.n * self.n)
            out["flop_bound"] = self.n * self.n / pairs if pairs else float("inf")
        return out

    def loop_nest(self) -> str:
        """The schedule as a loop nest, Halide style."""
        perm = "natural order" if self.order is None else f"permuted order ({self.n_kernel} positions)"
        lines = [
            f"for b, h in batch x heads:                      # {len(self.groups)} head group(s)",
            f"  for qt in 0..{self.q_tiles}:                   # query tiles of {self.block_m} tokens"
            f" (box {_box(self.tile_q)}), {perm}",
            f"    for kt in full[h][qt]:                       # no mask work",
            f"      S = Q[qt] @ K[kt]^T ; online softmax",
            f"    for kt in partial[h][qt]:                    # mask evaluated per element",
            f"      S = where(allowed(q, k), Q[qt] @ K[kt]^T, -inf) ; online softmax",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [f"plan {self.pattern.name}: N = {self.n}, tokens {self.pattern.layout.to_attn()}, "
               f"tiles {self.block_m} x {self.block_n} (q box {_box(self.tile_q)}, kv box {_box(self.tile_kv)})"]
        for note in self.notes:
            out.append(f"  note: {note}")
        for g in self.groups:
            head = g.lo
            s = self.stats(head)
            who = "every head" if g.hi is None else f"each of heads {g.lo}..{g.hi}"  # counts are per head
            line = (f"{who}: visited {s['visited']} of {self.q_tiles * self.kv_tiles} tiles "
                    f"({s['full']} full, {s['partial']} partial), tile bound {s['tile_bound']:.2f}x")
            if "flop_bound" in s:
                line += f", density {s['density']:.4f}, FLOP bound {s['flop_bound']:.2f}x"
            out.append(line)
            out.append(render_cells(self.tile_cells(head, 64, 64), *cell_factors(self.q_tiles, self.kv_tiles, 64, 64)))
        out.append("loop nest:")
        out.append(self.loop_nest())
        return "\n".join(out)

    def to_json(self) -> str:
        """JSON with shapes, stats and the padded tables of every head group."""
        doc: dict[str, Any] = {
            "pattern": self.pattern.name, "tokens": dict(zip(self.pattern.layout.names, self.pattern.layout.sizes)),
            "block_m": self.block_m, "block_n": self.block_n,
            "tile_q": list(self.tile_q), "tile_kv": list(self.tile_kv),
            "order": None if self.order is None else self.order.tolist(),
            "notes": list(self.notes), "groups": [],
        }
        for g in self.groups:
            doc["groups"].append({
                "heads": [g.lo, g.hi], "stats": self.stats(g.lo),
                "partial": _csr_json(g.partial), "full": _csr_json(g.full),
            })
        return json.dumps(doc, indent=1)

    def visits(self, head: int = 0) -> Iterator[tuple[int, int, int]]:
        """``(q_tile, kv_tile, kind)`` for every visited tile of one head, full tiles first."""
        g = self.group_for_head(head)
        for qt in range(self.q_tiles):
            for kt in g.full.row(qt):
                yield qt, int(kt), FULL
            for kt in g.partial.row(qt):
                yield qt, int(kt), PARTIAL

    # -- the dense oracle -------------------------------------------------------------------
    @staticmethod
    def from_mask(pattern: Pattern, masks: np.ndarray, block_m: int, block_n: int,
                  order: np.ndarray | None = None, tile_q: tuple[int, ...] | None = None,
                  tile_kv: tuple[int, ...] | None = None, notes: tuple[str, ...] = ()) -> "Plan":
        """Classify every tile of dense masks ``[heads, N, N]`` (O(N²); tests and tiny sizes).

        One head group per distinct branch of the pattern (``masks`` has one entry per head).
        """
        n = pattern.n
        pos = np.arange(n) if order is None else order
        nk = len(pos)
        nq_t, nk_t = -(-nk // block_m), -(-nk // block_n)
        groups = []
        pairs = []
        for lo, hi, _ in pattern.exprs():
            m = masks[lo]
            # Kernel-order mask with padding positions never allowed.
            km = np.zeros((nq_t * block_m, nk_t * block_n), dtype=bool)
            valid = pos >= 0
            sub = m[np.ix_(np.where(valid, pos, 0), np.where(valid, pos, 0))]
            sub &= valid[:, None] & valid[None, :]
            km[:nk, :nk] = sub
            t = km.reshape(nq_t, block_m, nk_t, block_n)
            any_ = t.any(axis=(1, 3))
            # Padding positions count as disallowed, so a tile holding any is never full: the
            # kernel must mask padding keys, which only partial tiles do.
            all_ = t.all(axis=(1, 3))
            groups.append(HeadGroup.of(lo, hi, BlockTable.from_dense(any_ & ~all_), BlockTable.from_dense(all_)))
            pairs.append(int(m.sum()))
        return Plan(pattern, block_m, block_n, tuple(tile_q or (block_m,)), tuple(tile_kv or (block_n,)),
                    order, tuple(groups), notes, tuple(pairs))


def _box(t: tuple[int, ...]) -> str:
    return "x".join(map(str, t))


def _csr_json(t: BlockTable) -> dict[str, Any]:
    return {"indptr": t.indptr.tolist(), "indices": t.indices.tolist()}


def _count_cells(t: BlockTable, fr: int, fc: int, shape: tuple[int, int]) -> np.ndarray:
    """Tiles of ``t`` per cell (tile ``(r, c)`` -> cell ``(r // fr, c // fc)``)."""
    if t.stored is None and t.ranges is not None:
        lo, hi = t.ranges
        r, j = np.nonzero(hi > lo)
        # A difference array over tile columns per cell row, then summed per cell column:
        # O(ranges + cell rows x tile columns), whatever the ranges' lengths.
        d = np.zeros((shape[0], t.cols + 1), dtype=np.int64)
        np.add.at(d, (r // fr, lo[r, j]), 1)
        np.add.at(d, (r // fr, hi[r, j]), -1)
        per_col = np.cumsum(d, axis=1)[:, :t.cols]
        if t.cols == 0:
            return np.zeros(shape, dtype=np.int64)
        return np.add.reduceat(per_col, np.arange(0, t.cols, fc), axis=1)
    out = np.zeros(shape, dtype=np.int64)
    rows = np.repeat(np.arange(t.rows, dtype=np.int64), t.counts())
    np.add.at(out, (rows // fr, t.indices.astype(np.int64) // fc), 1)
    return out


def cell_factors(q_tiles: int, kv_tiles: int, rows: int, cols: int) -> tuple[int, int]:
    """Tiles per cell (rows, columns) when ``q_tiles x kv_tiles`` is drawn in ``rows x cols``."""
    return max(1, -(-q_tiles // rows)), max(1, -(-kv_tiles // cols))


def render_cells(cells: np.ndarray, fr: int, fc: int) -> str:
    """ASCII of a tile map downsampled by :meth:`Plan.tile_cells` (``fr x fc`` tiles a cell)."""
    chars = np.array([".", "+", "#"])
    body = "\n".join("  " + "".join(chars[r]) for r in cells)
    scale = "" if fr == fc == 1 else f"  (each cell = {fr} x {fc} tiles)\n"
    return scale + body


def render_tile_map(m: np.ndarray, width: int = 64) -> str:
    """ASCII tile map: '#' full, '+' partial, '.' empty; downsampled to ``width`` columns.

    When downsampled, a cell shows the strongest class among the tiles it covers.
    """
    rows, cols = m.shape
    fr = max(1, -(-rows // width))
    fc = max(1, -(-cols // width))
    if fr > 1 or fc > 1:
        pr, pc = -(-rows // fr) * fr, -(-cols // fc) * fc
        mm = np.zeros((pr, pc), dtype=np.int8)
        mm[:rows, :cols] = m
        m = mm.reshape(pr // fr, fr, pc // fc, fc).max(axis=(1, 3))
    chars = np.array([".", "+", "#"])
    body = "\n".join("  " + "".join(chars[r]) for r in m)
    scale = "" if fr == fc == 1 else f"  (each cell = {fr} x {fc} tiles)\n"
    return scale + body
