"""Plan -> tensors: what the torch executor needs to walk one head group's tiles.

A :class:`TileSchedule` is a Plan's head group laid out for batched tensor work:

* ``slots [q_tiles, W]`` — the key tiles each query tile visits, full tiles first, then partial
  ones, ragged rows padded with a *dummy* slot (key tile 0 under an all ``-inf`` bias, so the
  key tensor needs no extra zero tile and contributes exactly nothing);
  rows are windows of consecutive tiles, sorted, and chunked as :mod:`attnlang.rows` decides
  (``layout``: the same decisions the simulator's CPU model prices);
* ``bias_id [q_tiles, W]`` — per slot, a row of ``bias [2 + partial, BM, BN]``: ``0`` = a full
  tile (all zeros), ``1`` = the dummy (all ``-inf``), ``2 + j`` = partial tile ``j``'s mask as an
  additive ``0 / -inf`` bias, evaluated once with the IR's ``allowed`` on the tile's tokens;
* ``q_index`` / ``k_index`` — kernel position -> token (``N`` for padding, which reads a zero row);
  ``q_inverse`` — token -> kernel position, to return results in the user's order;
* ``row_empty`` — kernel rows that no key may be seen from (zero output, ``lse = -inf``).

Schedules are cached per (plan, head group, device) for as long as the plan lives.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from attnlang.pattern import Env
from attnlang.plan import Plan
from attnlang.rows import RowLayout, row_layout

_CACHE: dict[tuple[int, int, str], "TileSchedule"] = {}


@dataclass(frozen=True)
class TileSchedule:
    """One head group of a plan as index and bias tensors (see the module docstring)."""

    block_m: int
    block_n: int
    q_tiles: int
    kv_tiles: int
    slots: torch.Tensor  # int64 [q_tiles, W]; dummy slots read key tile 0
    bias_id: torch.Tensor  # int64 [q_tiles, W]; 0 full, 1 dummy, 2 + j partial j
    bias: torch.Tensor  # float32 [2 + partial, BM, BN]: 0 where allowed, -inf elsewhere
    q_index: torch.Tensor  # int64 [q_tiles * BM]: kernel position -> token (N = padding)
    k_index: torch.Tensor  # int64 [kv_tiles * BN]: kernel position -> token (N = padding)
    q_inverse: torch.Tensor  # int64 [N]: token -> kernel position
    k_inverse: torch.Tensor  # int64 [N]
    row_empty: torch.Tensor  # bool [q_tiles * BM]: rows that see no key at all
    identity: bool  # natural order with no padding: tensors are tiled as views, no gathers
    # Windows (slots = window_start + 0..W: strided key views) or widest-first row order (rows
    # of slots / bias_id and q_index follow layout.q_perm, so a chunk pads to its own widest
    # row, not the group's: one global-token row no longer makes every chunk that wide).
    layout: RowLayout
    chunk_bias: dict = field(default_factory=dict, compare=False)  # executor's per-chunk bias cache

    @property
    def width(self) -> int:
        return self.slots.shape[1]

    @property
    def q_identity(self) -> bool:
        """Queries need no gather: natural order, no padding, tiles not reordered."""
        return self.identity and self.layout.q_perm is None

    @property
    def has_partial(self) -> bool:
        return self.bias.shape[0] > 2


def schedule_for(plan: Plan, group: int, inputs: Mapping[str, np.ndarray] | None,
                 device: torch.device, content: Mapping | None = None) -> TileSchedule:
    """The (cached) schedule of ``plan.groups[group]`` with one batch item's runtime inputs
    (and routing ``content`` for patterns with ``route``: partial tiles read the selection)."""
    key = (id(plan), group, str(device))
    hit = _CACHE.get(key)
    if hit is None:
        hit = _build(plan, group, inputs or {}, device, content or {})
        _CACHE[key] = hit
        # Drop the entry with the plan: ids are reused once an object dies.
        weakref.finalize(plan, _CACHE.pop, key, None)
    return hit


def _positions(plan: Plan, tiles: int, block: int) -> np.ndarray:
    """Kernel position -> token over ``tiles * block`` positions, ``-1`` for padding."""
    pos = np.full(tiles * block, -1, dtype=np.int64)
    src = np.arange(plan.n, dtype=np.int64) if plan.order is None else np.asarray(plan.order, dtype=np.int64)
    pos[:len(src)] = src
    return pos


def _inverse(pos: np.ndarray, n: int) -> np.ndarray:
    inv = np.empty(n, dtype=np.int64)
    ok = pos >= 0
    inv[pos[ok]] = np.nonzero(ok)[0]
    return inv


def partial_masks(plan: Plan, expr, env: Env, qpos: np.ndarray, kpos: np.ndarray,
                  q_tiles: np.ndarray, k_tiles: np.ndarray) -> np.ndarray:
    """bool ``[P, BM, BN]``: the IR's ``allowed`` on partial tiles' tokens; padding never allowed."""
    bm, bn = plan.block_m, plan.block_n
    qp = qpos.reshape(-1, bm)[q_tiles][:, :, None]  # [P, BM, 1]
    kp = kpos.reshape(-1, bn)[k_tiles][:, None, :]  # [P, 1, BN]
    out = np.empty((len(q_tiles), bm, bn), dtype=bool)
    # Bounded temporaries: evaluate a few thousand tiles at a time.
    step = max(1, (1 << 22) // (bm * bn))
    lay = plan.pattern.layout
    for s in range(0, len(q_tiles), step):
        a, b = qp[s:s + step], kp[s:s + step]
        ok = np.broadcast_to(expr.allowed(lay.points(np.maximum(a, 0)), lay.points(np.maximum(b, 0)), env),
                             (len(a), bm, bn))
        out[s:s + step] = ok & (a >= 0) & (b >= 0)
    return out


def _build(plan: Plan, group: int, inputs: Mapping[str, np.ndarray], device: torch.device,
           content: Mapping = {}) -> TileSchedule:  # noqa: B006 (read only)
    g = plan.groups[group]
    expr = plan.pattern.expr_for_head(g.lo)
    env = Env(plan.pattern.layout, dict(inputs), g.lo, content)
    bm, bn, nq, nk = plan.block_m, plan.block_n, plan.q_tiles, plan.kv_tiles
    qpos, kpos = _positions(plan, nq, bm), _positions(plan, nk, bn)

    fcount, pcount = g.full.counts(), g.partial.counts()
    layout = row_layout(g.full, g.partial)
    width = layout.width
    slots = np.zeros((nq, width), dtype=np.int64)
    bias_id = np.ones((nq, width), dtype=np.int64)
    # Column of each CSR entry within its row: full tiles first, then partial ones.
    frow = np.repeat(np.arange(nq), fcount)
    fcol = np.arange(g.full.nnz) - np.repeat(g.full.indptr[:-1], fcount)
    prow = np.repeat(np.arange(nq), pcount)
    pcol = np.arange(g.partial.nnz) - np.repeat(g.partial.indptr[:-1], pcount) + fcount[prow]
    slots[frow, fcol] = g.full.indices
    bias_id[frow, fcol] = 0
    slots[prow, pcol] = g.partial.indices
    bias_id[prow, pcol] = 2 + np.arange(g.partial.nnz)

    if layout.window_start is not None:
        slots, bias_id = _as_windows(slots, bias_id, layout.window_start, width)

    allow = partial_masks(plan, expr, env, qpos, kpos, prow, g.partial.indices.astype(np.int64))
    bias = np.zeros((2 + len(allow), bm, bn), dtype=np.float32)
    bias[1] = -np.inf
    bias[2:][~allow] = -np.inf

    # A row sees some key iff its tile has a full tile, or a partial tile allows something in it.
    row_any = np.zeros((nq, bm), dtype=bool)
    row_any[fcount > 0] = True
    if len(allow):
        np.logical_or.at(row_any, prow, allow.any(axis=2))

    q_perm = layout.q_perm
    if q_perm is not None:  # widest first: each chunk pads to its own widest row
        slots, bias_id = slots[q_perm], bias_id[q_perm]
        qpos = qpos.reshape(nq, bm)[q_perm].reshape(-1)
        row_any = row_any[q_perm]

    n = plan.n
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return TileSchedule(
        bm, bn, nq, nk, t(slots), t(bias_id), t(bias),
        t(np.where(qpos >= 0, qpos, n)), t(np.where(kpos >= 0, kpos, n)),
        t(_inverse(qpos, n)), t(_inverse(kpos, n)), t(~row_any.reshape(-1)),
        plan.order is None and n == nq * bm == nk * bn, layout)


def _as_windows(slots: np.ndarray, bias_id: np.ndarray, start: np.ndarray, width: int):
    """Lay rows out as ``start + 0..width`` (the layout checked that every row fits its window).

    Unvisited positions inside a window become dummies. Consecutive key tiles are then a strided
    view of the key tensor (band patterns: no gather at all).
    """
    visited = bias_id != 1
    rows, cols = np.nonzero(visited)
    new_bias = np.ones_like(bias_id)
    new_bias[rows, slots[rows, cols] - start[rows]] = bias_id[rows, cols]
    return start[:, None] + np.arange(width), new_bias
