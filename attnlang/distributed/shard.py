"""Dispatch for context parallelism: which rank owns which tokens, and which K/V tiles move.

Pure numpy (no torch): the simulator, the benchmarks and the property tests use it without
processes. :func:`shard` reads a :class:`~attnlang.plan.Plan` (or one plan per batch item) and
returns a :class:`Sharding`:

* **units.** The kernel-order sequence is cut into units of ``max(block_m, block_n)`` positions,
  so every query tile and every key tile lies in exactly one unit. A rank owns whole units; the
  K/V of a token live with the rank that owns the token's queries.
* **cost.** A unit costs what its query tiles visit, weighted as the simulator's cost model does
  (a partial tile is ``1 + mask_cost`` full tiles, plus a per-query-tile overhead), summed over
  head groups (weighted by their head counts) and batch items.
* **assignment.** Candidates cut the unit sequence into ``k * R`` contiguous segments of equal
  cost (``k`` = 1, 2, 4) and deal them to the ranks in snake order (``0..R-1, R-1..0, ...``).
  The candidate with the smallest largest-rank cost, compute plus ``cost.comm`` per received key
  tile and head, wins (ties: fewer segments, i.e. longer contiguous runs). Band patterns keep ``k = 1``
  (a halo is all they receive); causal patterns pick ``k = 2``: zigzag falls out, because it
  moves less K/V to the last rank than a contiguous cut of equal compute.
* **communication.** From the plan rows of each rank's query tiles, the key tiles it needs that
  another rank owns: :attr:`Sharding.recv` ``[r][s]`` lists the key tiles rank ``r`` receives
  from rank ``s``, each once.

    >>> from attnlang import make_plan, causal
    >>> s = shard(make_plan(causal, tokens=8192), 4)
    >>> s.segments_per_rank, s.imbalance < 1.05
    (2, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from attnlang.errors import AttnError
from attnlang.plan import Plan

SEGMENTS = (1, 2, 4)  # contiguous segments per rank the assignment tries


@dataclass(frozen=True)
class TileCost:
    """Relative costs of the simulator's model, in full-tile units.

    ``partial`` = 1 + the target's ``mask_cost``; ``query_tile`` = per-query-tile overhead;
    ``comm`` = receiving one key tile (its K and V) of one head against computing one full tile of
    one head. The default 8 lies between gloo on a CPU (about 6: 32 KiB of fp32 K/V at 0.5 GB/s
    against an 11 us tile) and NVLink on an H100 (about 19); ``simulate --ranks`` derives it from
    the target.
    """

    partial: float = 1.15
    query_tile: float = 0.0
    comm: float = 8.0


def tile_rows(plan: Plan, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(q_tile, kv_tile)`` pairs of one head group: full pairs, then partial pairs.

    The ONE adapter between distributed code and the plan's row representation: everything
    else reads plans through it (and through ``Plan``'s public shape properties).
    """
    g = plan.groups[group]
    out = []
    for table in (g.full, g.partial):
        rows = np.repeat(np.arange(table.rows, dtype=np.int64), table.counts())
        out += [rows, np.asarray(table.indices, dtype=np.int64)]
    return out[0], out[1], out[2], out[3]


def group_heads(plan: Plan, heads: int) -> list[tuple[int, int, int]]:
    """``(group index, head lo, head hi)`` of every head group of ``plan`` for ``heads`` heads."""
    out = []
    for gi, g in enumerate(plan.groups):
        hi = heads if g.hi is None else min(g.hi, heads)
        if g.lo < hi:
            out.append((gi, g.lo, hi))
    return out


@dataclass(frozen=True)
class Sharding:
    """Tokens and tiles of each rank, and the key tiles each rank receives (see the module doc).

    ``order`` lists kernel positions (``-1`` = padding) over ``units * unit`` positions; unit
    ``u`` is ``order[u * unit:(u + 1) * unit]``, query tile ``t`` ``order[t * block_m:...]``,
    key tile ``t`` ``order[t * block_n:...]``.
    """

    world_size: int
    n: int  # tokens
    block_m: int
    block_n: int
    unit: int  # kernel positions per unit
    order: np.ndarray  # int64 [units * unit]: kernel position -> token, -1 = padding
    owner: np.ndarray  # int32 [units]: rank of each unit
    work: np.ndarray  # float64 [R]: compute cost per rank (full-tile units)
    recv: tuple[tuple[np.ndarray, ...], ...]  # [r][s]: key tiles r receives from s (sorted)
    segments_per_rank: int  # the winning candidate's k
    cost: TileCost

    # -- sizes ------------------------------------------------------------------------------
    @property
    def units(self) -> int:
        return len(self.owner)

    @property
    def q_tiles(self) -> int:
        return len(self.order) // self.block_m

    @property
    def kv_tiles(self) -> int:
        return len(self.order) // self.block_n

    @property
    def imbalance(self) -> float:
        """Largest rank's compute over the mean (1.0 = perfect balance)."""
        mean = float(self.work.mean())
        return float(self.work.max()) / mean if mean > 0 else 1.0

    # -- per rank ---------------------------------------------------------------------------
    def units_of(self, rank: int) -> np.ndarray:
        """Units of ``rank`` in ascending order (its local token order)."""
        return np.nonzero(self.owner == rank)[0]

    def positions(self, rank: int) -> np.ndarray:
        """Kernel positions of ``rank``'s units, in local order (padding included)."""
        u = self.units_of(rank)
        return (u[:, None] * self.unit + np.arange(self.unit)).reshape(-1)

    def tokens(self, rank: int) -> np.ndarray:
        """Token indices of ``rank``'s local part, in local order (what ``shard(x)`` keeps)."""
        t = self.order[self.positions(rank)]
        return t[t >= 0]

    def local_sizes(self) -> np.ndarray:
        """Tokens per rank."""
        real = (self.order >= 0).reshape(self.units, self.unit).sum(axis=1)
        return np.bincount(self.owner, weights=real, minlength=self.world_size).astype(np.int64)

    def q_tiles_of(self, rank: int) -> np.ndarray:
        """Query tiles of ``rank``, ascending."""
        per = self.unit // self.block_m
        return (self.units_of(rank)[:, None] * per + np.arange(per)).reshape(-1)

    def kv_owner(self) -> np.ndarray:
        """int32 ``[kv_tiles]``: the rank owning each key tile."""
        return np.repeat(self.owner, self.unit // self.block_n)

    def tile_tokens(self, tiles: np.ndarray) -> np.ndarray:
        """Real tokens of key tiles ``tiles`` in order (padding dropped)."""
        t = self.order[(np.asarray(tiles, dtype=np.int64)[:, None] * self.block_n
                        + np.arange(self.block_n)).reshape(-1)]
        return t[t >= 0]

    def recv_tokens(self) -> np.ndarray:
        """int64 ``[R, R]``: tokens rank ``r`` receives from rank ``s`` (K and V each)."""
        real = (self.order >= 0).reshape(-1, self.block_n).sum(axis=1)
        return np.array([[int(real[t].sum()) for t in row] for row in self.recv], dtype=np.int64)

    def bytes_moved(self, token_bytes: int) -> dict[str, np.ndarray]:
        """Bytes each rank receives in the forward (K/V tiles) and backward (dK/dV partials
        back to their owners), for ``token_bytes`` = bytes of one token's K *and* V over every
        batch item and KV head; and what a full K/V all-gather would move per rank."""
        m = self.recv_tokens() * token_bytes
        sizes = self.local_sizes()
        return {"forward": m.sum(axis=1), "backward": m.sum(axis=0),
                "all_gather": (self.n - sizes) * token_bytes}

    def describe(self) -> str:
        k = self.segments_per_rank
        how = "contiguous runs" if k == 1 else f"{k} segments per rank in snake order" + \
            (" (zigzag)" if k == 2 else "")
        return (f"{self.world_size} ranks, {self.units} units of {self.unit} positions, {how}; "
                f"imbalance {self.imbalance:.3f}")


# --------------------------------------------------------------------------------------------
# shard
# --------------------------------------------------------------------------------------------

def shard(plan: Plan | Sequence[Plan], world_size: int, *, heads: int | None = None,
          cost: TileCost = TileCost(), segments: Sequence[int] = SEGMENTS, unit: int | None = None,
          routed: bool = False) -> Sharding:
    """Assign a plan's query tiles to ``world_size`` ranks (see the module docstring).

    ``plan`` may be one plan per batch item (runtime inputs): they must share tiles and order,
    and their costs add up. ``heads`` weights head groups by their head counts (default: one
    head per group, or the pattern's ``heads``). ``unit`` (a multiple of both tile sizes) makes
    units longer than ``max(block_m, block_n)``; ``routed`` accepts a routed plan made from a
    representative selection (ContextParallel routes each call itself). O(units + visited tiles).
    """
    plans = [plan] if isinstance(plan, Plan) else list(plan)
    if not plans:
        raise AttnError("shard() needs a plan")
    p0 = plans[0]
    if not isinstance(world_size, (int, np.integer)) or isinstance(world_size, bool) or world_size < 1:
        raise AttnError(f"world_size = {world_size!r} must be a positive integer")
    if p0.levels is not None:
        raise AttnError(f"pattern '{p0.pattern.name}' is a pyramid(...) pattern: context parallelism does not "
                        "run pooled pyramids yet", hint="run it with attnlang.compile on one device per sequence")
    if p0.pattern.reads_content and not routed:
        raise AttnError(f"pattern '{p0.pattern.name}' reads Q/K (route): its tiles are only known per call",
                        hint="shard a plan made from representative content with routed=True and units that "
                             "hold whole route blocks (unit=); ContextParallel routes every call itself")
    for p in plans[1:]:
        same = (p.block_m, p.block_n, p.n_kernel) == (p0.block_m, p0.block_n, p0.n_kernel) and (
            (p.order is None and p0.order is None) or
            (p.order is not None and p0.order is not None and np.array_equal(p.order, p0.order)))
        if not same:
            raise AttnError("the batch items' plans differ in tiles or token order; plan them with the "
                            "same block_m / block_n")
    bm, bn = p0.block_m, p0.block_n
    base = max(bm, bn)
    unit = base if unit is None else math.lcm(base, int(unit))
    units = -(-p0.n_kernel // unit)
    if world_size > units:
        raise AttnError(f"world size {world_size} exceeds the {units} units of {unit} tokens of "
                        f"'{p0.pattern.name}' (N = {p0.n}): some rank would hold nothing",
                        hint="use fewer ranks or smaller tiles (block_m / block_n)")
    order = np.full(units * unit, -1, dtype=np.int64)
    src = np.arange(p0.n, dtype=np.int64) if p0.order is None else np.asarray(p0.order, dtype=np.int64)
    order[:len(src)] = src

    nh = heads if heads is not None else (p0.pattern.heads or 1)
    qcost = np.zeros(units * (unit // bm), dtype=np.float64)
    pairs = []  # (q_tile, kv_tile) of every visited tile, over groups and items
    for p in plans:
        for gi, lo, hi in group_heads(p, nh):
            fq, fk, pq, pk = tile_rows(p, gi)
            w = hi - lo
            np.add.at(qcost, fq, w)
            np.add.at(qcost, pq, w * cost.partial)
            qcost[:p.q_tiles] += w * cost.query_tile
            pairs.append((np.concatenate([fq, pq]), np.concatenate([fk, pk])))
    ucost = qcost.reshape(units, unit // bm).sum(axis=1)
    qt = np.concatenate([a for a, _ in pairs]) if pairs else np.zeros(0, np.int64)
    kt = np.concatenate([b for _, b in pairs]) if pairs else np.zeros(0, np.int64)
    q_unit, k_unit = qt * bm // unit, kt * bn // unit
    # Distinct (query unit, key tile) needs: what any owner of that unit must hold.
    need = np.unique(q_unit * (units * (unit // bn)) + kt)
    need_u, need_k = need // (units * (unit // bn)), need % (units * (unit // bn))
    del q_unit, k_unit

    best = None
    for k in sorted(set(segments)):
        if k * world_size > units:
            continue
        owner = _snake(_segments(ucost, k * world_size), world_size)
        recv, n_recv = _recv(owner, need_u, need_k, unit // bn, world_size)
        work = np.bincount(owner, weights=ucost, minlength=world_size)
        score = float((work + cost.comm * nh * n_recv).max())
        if best is None or score < best[0] * (1 - 1e-9):
            best = (score, k, owner, recv, work)
    if best is None:
        raise AttnError(f"no segmentation fits {units} units on {world_size} ranks")
    _, k, owner, recv, work = best
    return Sharding(world_size, p0.n, bm, bn, unit, order, owner.astype(np.int32), work, recv, k, cost)


def _segments(ucost: np.ndarray, count: int) -> np.ndarray:
    """Segment index of every unit: ``count`` contiguous segments of about equal cost, none empty."""
    units = len(ucost)
    csum = np.cumsum(ucost)
    total = csum[-1] if units else 0.0
    if total <= 0:
        cuts = np.linspace(0, units, count + 1)[1:-1].round().astype(np.int64)
    else:
        # Cut after the unit whose running cost is nearest each target.
        targets = total * np.arange(1, count) / count
        right = np.searchsorted(csum, targets)
        left = np.maximum(right - 1, 0)
        pick_left = np.abs(csum[left] - targets) <= np.abs(csum[np.minimum(right, units - 1)] - targets)
        cuts = np.where(pick_left, left, right) + 1
    # Every segment non-empty: cuts strictly increasing within 1..units-1.
    cuts = np.clip(cuts, 1, units - 1)
    for i in range(len(cuts)):
        lo = (cuts[i - 1] + 1) if i else 1
        cuts[i] = max(cuts[i], lo)
    for i in range(len(cuts) - 1, -1, -1):
        hi = (cuts[i + 1] - 1) if i + 1 < len(cuts) else units - 1
        cuts[i] = min(cuts[i], hi)
    seg = np.zeros(units, dtype=np.int64)
    seg[cuts] = 1
    return np.cumsum(seg)


def _snake(seg: np.ndarray, world_size: int) -> np.ndarray:
    """Rank of every unit: segment ``s`` goes to ``s % R`` on even passes, ``R - 1 - s % R`` on odd."""
    passes, pos = seg // world_size, seg % world_size
    return np.where(passes % 2 == 0, pos, world_size - 1 - pos)


def _recv(owner: np.ndarray, need_u: np.ndarray, need_k: np.ndarray, per_unit: int, world_size: int):
    """``(recv[r][s], received tiles per rank)`` for an assignment ``owner`` of units."""
    r = owner[need_u]
    s = owner[need_k // per_unit]
    far = r != s
    key = np.unique(r[far].astype(np.int64) * (len(owner) * per_unit) + need_k[far])
    rr, kk = key // (len(owner) * per_unit), key % (len(owner) * per_unit)
    ss = owner[kk // per_unit].astype(np.int64)
    # Sorted by (receiver, sender, tile): one split per pair, O(n log n) rather than R^2 scans.
    order = np.lexsort((kk, ss, rr))
    cuts = np.cumsum(np.bincount(rr * world_size + ss, minlength=world_size * world_size))[:-1]
    parts = np.split(kk[order], cuts)
    recv = tuple(tuple(parts[a * world_size + b] for b in range(world_size)) for a in range(world_size))
    return recv, np.bincount(rr, minlength=world_size).astype(np.float64)
