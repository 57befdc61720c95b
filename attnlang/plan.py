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
from typing import Any, Callable, Iterator

import numpy as np

from attnlang.pattern import Pattern

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockTable:
    """CSR table: row ``i`` (a query tile, or a key tile when transposed) lists tile indices."""

    indptr: np.ndarray  # int64 [rows + 1]
    indices: np.ndarray  # int32 [nnz], sorted within each row
    cols: int  # number of possible column tiles

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i]:self.indptr[i + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def transpose(self) -> "BlockTable":
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
    # pair (0 = skipped), i.e. the (query tile, key block, level) list of LANGUAGE.md §6.2
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
            rows = np.repeat(np.arange(table.rows), table.counts())
            m[rows, table.indices] = val
        return m

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
            out.append(render_tile_map(self.tile_map(head)))
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
