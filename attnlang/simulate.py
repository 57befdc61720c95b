"""The speedup simulator: Plan -> Report (how much faster than dense, and where it is lost).

For a plan and a hardware target it gives, as speedups over the dense kernel of the same backend
(same tile shapes, every tile full, natural order), forward and backward:

1. ``flop_bound``     -- ``heads * N^2 / allowed pairs``: what an element-sparse kernel could reach;
2. ``tile_bound``     -- dense tiles / visited tiles: what any kernel with these tiles can reach;
3. ``schedule_bound`` -- the tile work with per-tile costs (partial tiles pay the mask), per-CTA
   overhead, uneven work between query tiles and wave quantisation over the target's SMs
   (CTAs list-scheduled in launch order); never above ``tile_bound``;
4. ``predicted``      -- the schedule plus the overheads the plan adds outside the tile loop:
   token permutation passes, index-table reads (tabulated plans only) and, for patterns that
   read Q/K (``route``/``pyramid``, docs/language.md §13), the routing stage (pooling, block scores,
   selection, key permutation, pooled key levels).

>>> from attnlang import causal, simulate, sliding
>>> r = simulate(causal & sliding(256), "h100", tokens=8192, heads=16)
>>> r.forward.flop_bound > r.forward.tile_bound >= r.forward.schedule_bound > 1
True

The model is deliberately simple and every number it uses is in the target profile
(:mod:`attnlang.targets`); ``docs/simulator.md`` explains it and shows how it was validated.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from attnlang.boxes import token_boxes
from attnlang.distributed.report import rank_report
from attnlang.distributed.shard import TileCost, shard
from attnlang.errors import AttnError
from attnlang.pairs import allowed_pairs
from attnlang.pattern import Pattern, Pyramid
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.pyramid import pattern_content as pyramid_content
from attnlang.routing import routes
from attnlang.routing import pattern_content as routing_content
from attnlang.rows import chunks, dense_layout, row_layout
from attnlang.targets import PACKAGED, PassCosts, Target, load_target

SCHEMA = "attnlang.report/1"
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# Share of the backward tile work done in the dK/dV pass (CTA per key tile): it recomputes S and
# dP and forms dV and dK (4 matmuls); the dQ pass (CTA per query tile) does 3 (S, dP, dQ).
DKDV_SHARE = 4 / 7
COMPONENTS = ("full tiles", "partial tiles", "row padding", "mask", "gather", "tile fixed", "CTA overhead", "idle")


@dataclass(frozen=True)
class Direction:
    """Bounds, times and the time breakdown of one direction (forward or backward)."""

    flop_bound: float
    tile_bound: float
    schedule_bound: float
    predicted: float  # speedup including the overheads
    dense_s: float  # the dense kernel's time
    kernel_s: float  # the sparse kernel's scheduled time (no overheads)
    time_s: float  # kernel_s + overheads
    overheads_s: Mapping[str, float]  # "permute", "index_tables", "routing"
    breakdown_s: Mapping[str, float]  # kernel_s split by COMPONENTS (sums to kernel_s)
    clamped: bool = False  # the schedule model beat the tile bound (wave luck) and was clamped

    def gaps(self) -> dict[str, float]:
        """The factors between the bounds: flop/tile, tile/schedule, schedule/predicted."""
        return {"tile granularity": _ratio(self.flop_bound, self.tile_bound),
                "schedule": _ratio(self.tile_bound, self.schedule_bound),
                "overheads": _ratio(self.schedule_bound, self.predicted)}


@dataclass(frozen=True)
class Report:
    """What the simulator predicts for one plan on one target; print it, or export it."""

    pattern: str
    target: str
    target_description: str
    dtype: str
    head_dim: int
    batch: int
    heads: int
    n: int
    n_kernel: int
    block_m: int
    block_n: int
    order: str  # "natural" or "permuted"
    analytic: bool  # loop bounds in closed form (no index tables)
    tiles: Mapping[str, int]  # dense, visited, full, partial (summed over heads)
    allowed_pairs: int  # summed over heads
    density: float
    forward: Direction
    backward: Direction
    closed_form: Mapping[str, str] | None = None
    notes: tuple[str, ...] = ()

    # The forward numbers are what most users ask for first.
    @property
    def flop_bound(self) -> float:
        return self.forward.flop_bound

    @property
    def tile_bound(self) -> float:
        return self.forward.tile_bound

    @property
    def schedule_bound(self) -> float:
        return self.forward.schedule_bound

    def to_dict(self) -> dict[str, Any]:
        """Plain data (infinite bounds as ``None``); the JSON schema of ``to_json``."""
        d = asdict(self)
        for key in ("forward", "backward"):
            d[key]["gaps"] = getattr(self, key).gaps()
        d["schema"] = SCHEMA
        return json_safe(d)

    def to_json(self) -> str:
        """JSON, schema ``attnlang.report/1`` (see ``docs/simulator.md``)."""
        return json.dumps(self.to_dict(), indent=1)

    def _rows(self) -> list[tuple[str, str, str]]:
        f, b = self.forward, self.backward
        rows = [(name, format_speedup(getattr(f, attr)), format_speedup(getattr(b, attr))) for name, attr in (
            ("FLOP bound", "flop_bound"), ("tile bound", "tile_bound"),
            ("schedule bound", "schedule_bound"), ("predicted speedup", "predicted"))]
        rows += [("dense time", format_time(f.dense_s), format_time(b.dense_s)),
                 ("predicted time", format_time(f.time_s), format_time(b.time_s))]
        for c in COMPONENTS:
            rows.append((f"  {c}", _share(f.breakdown_s[c], f.time_s), _share(b.breakdown_s[c], b.time_s)))
        for o in f.overheads_s:
            rows.append((f"  {o.replace('_', ' ')}", _share(f.overheads_s[o], f.time_s),
                         _share(b.overheads_s[o], b.time_s)))
        return rows

    def _header(self) -> list[str]:
        t = self.tiles
        out = [f"{self.pattern} on {self.target} ({self.target_description}), {self.dtype}, "
               f"D = {self.head_dim}, batch {self.batch}, {self.heads} query heads",
               # counts are totals over the query heads (`attnlang plan` prints them per head)
               f"N = {self.n}, tiles {self.block_m} x {self.block_n}, {self.order} order, "
               f"{'analytic' if self.analytic else 'tabulated'} plan: visited {t['visited']} of "
               f"{t['dense']} tiles ({t['full']} full, {t['partial']} partial), all {self.heads} heads together",
               f"allowed pairs {self.allowed_pairs} over all heads (density {self.density:.4g})"]
        if self.closed_form:
            cf = self.closed_form
            out.append(f"closed form: pairs = {cf['pairs']}   [{cf['symbols']}]")
            if "tiles" in cf:
                out.append(f"             visited tiles = {cf['tiles']}   (square tiles of B tokens)")
        return out

    def __str__(self) -> str:
        rows = [("", "forward", "backward")] + self._rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        body = [f"{a:<{w0}}  {b:>{w1}}  {c:>10}" for a, b, c in rows]
        body.insert(1, "-" * len(body[0]))
        gaps = "; ".join(f"{k} {format_speedup(v)}" for k, v in self.forward.gaps().items())
        return "\n".join(self._header() + [""] + body + ["", f"forward gaps: {gaps}"]
                         + [f"note: {n}" for n in self.notes])

    def to_markdown(self) -> str:
        head = "\n".join(f"* {line}" for line in self._header())
        table = ["| | forward | backward |", "| --- | ---: | ---: |"]
        table += [f"| {a.strip()} | {b} | {c} |" for a, b, c in self._rows()]
        notes = "".join(f"\n* note: {n}" for n in self.notes)
        return f"### {self.pattern} on {self.target}\n\n{head}{notes}\n\n" + "\n".join(table) + "\n"


# --------------------------------------------------------------------------------------------
# The front door
# --------------------------------------------------------------------------------------------

def simulate_pattern(spec: "Pattern | Plan", target: "str | Target" = "h100", *, dtype: str | None = None,
                     head_dim: int = 128, batch: int = 1, heads: int | None = None,
                     inputs: Mapping[str, Any] | None = None, block_m: int | None = None,
                     block_n: int | None = None, content: Mapping[Any, np.ndarray] | None = None) -> Report:
    """The model for a bound :class:`~attnlang.pattern.Pattern` (planned here, with
    ``block_m``/``block_n``) or a ready :class:`Plan`; :func:`attnlang.simulate` resolves any
    other spec first. A pattern that reads Q/K is planned for ``content``, by default for seeded
    Gaussian Q/K (:func:`sample_content`).

    >>> from attnlang.pattern import Pattern, full
    >>> simulate_pattern(Pattern.create(full, 4096), "a100").forward.schedule_bound
    1.0
    """
    tgt = load_target(target)
    if isinstance(spec, Plan):
        plan = spec
    else:
        if spec.reads_content and content is None:
            content = sample_content(spec, heads or spec.heads or 8, head_dim)
        np_inputs = None if inputs is None else {k: np.asarray(v) for k, v in inputs.items()}
        plan = make_plan(spec, inputs=np_inputs, block_m=block_m, block_n=block_n, content=content)
    return simulate_plan(plan, tgt, dtype=dtype, head_dim=head_dim, batch=batch, heads=heads, inputs=inputs,
                         content=content)


SAMPLE_HEAD_DIM = 128  # the head dim of sampled Q/K, unless a caller names its own


def sample_content(pattern: Any, heads: int, head_dim: int = SAMPLE_HEAD_DIM, seed: int = 0) -> dict | None:
    """Routing decisions of a pattern that reads Q/K, for seeded Gaussian Q/K of ``heads`` heads
    (what the simulator plans with when it is given no content, and what the CLI's ``plan`` and
    ``show`` show); None for static patterns. The one place content is sampled.

    >>> from attnlang.pattern import Pattern, route
    >>> c = sample_content(Pattern.create(route(64, top=2), 256), heads=2, head_dim=16)
    >>> [v.shape for v in c.values()]
    [(2, 256, 4)]
    """
    if not pattern.reads_content:
        return None
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((heads, pattern.n, head_dim), dtype=np.float32) for _ in range(2))
    oracle = pyramid_content if isinstance(pattern.attend, Pyramid) else routing_content
    return oracle(pattern, q, k)


def simulate_plan(plan: Plan, target: "str | Target" = "h100", *, dtype: str | None = None,
                  head_dim: int = 128, batch: int = 1, heads: int | None = None,
                  inputs: Mapping[str, Any] | None = None,
                  content: Mapping[Any, np.ndarray] | None = None) -> Report:
    """The model itself, for a given plan (see the module docstring); ``content`` is the routing
    content the plan was made with (pattern that read Q/K only; used to count allowed pairs)."""
    tgt = load_target(target)
    dtype = dtype or ("bf16" if tgt.kind == "gpu" else "fp32")
    if dtype not in DTYPE_BYTES:
        raise AttnError(f"unknown dtype '{dtype}'", hint=f"valid: {', '.join(DTYPE_BYTES)}")
    tgt.peak(dtype)  # raises for a dtype the target lacks
    p = plan.pattern
    heads = heads if heads is not None else (p.heads or 8)
    for name, v in (("head_dim", head_dim), ("batch", batch), ("heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AttnError(f"{name} = {v!r} must be a positive integer")
    if p.heads is not None and heads != p.heads:
        raise AttnError(f"pattern '{p.name}' declares heads {p.heads}; got heads = {heads}")

    if p.reads_content and len(plan.groups) < heads:
        raise AttnError(f"the plan of '{p.name}' was routed for {len(plan.groups)} head(s) but heads = {heads}",
                        hint="plan it with content for every head (simulate(...) does this itself)")
    head_groups = [plan.group_for_head(h) for h in range(heads)]
    per_group = {id(g): allowed_pairs(plan, g, inputs, content) for g in head_groups}
    pairs = sum(per_group[id(g)] for g in head_groups)
    dense_tiles = -(-p.n // plan.block_m) * -(-p.n // plan.block_n) * heads
    full = sum(g.full.nnz for g in head_groups)
    partial = sum(g.partial.nnz for g in head_groups)
    if plan.levels is not None:  # tiles of pooled keys, what the kernels visit (not token tiles)
        full, partial = 0, int(_pyramid_work(plan, heads, 1).partial.sum())
    visited = full + partial
    flop_bound = _ratio(heads * p.n * p.n, pairs)
    tile_bound = _ratio(dense_tiles, visited)
    analytic = all(g.analytic is not None for g in head_groups)

    notes = list(plan.notes)
    if p.reads_content:
        notes.append("routing decisions depend on Q/K: simulated for the content this plan was made "
                     "with (seeded Gaussian Q/K unless given); the routing stage is the 'routing' overhead")
    directions = {}
    for direction in ("forward", "backward"):
        costs = getattr(tgt, direction)
        tile_s = _tile_seconds(tgt, costs, dtype, head_dim, plan.block_m, plan.block_n)
        d, clamped = _direction(plan, tgt, costs, tile_s, direction, heads, batch, dtype, head_dim,
                                flop_bound, tile_bound, analytic)
        directions[direction] = d
        if clamped:
            notes.append(f"{direction}: the sparse launch fills the last wave better than the dense one; "
                         "schedule bound clamped to the tile bound")
    from attnlang.closed_form import derive  # function-level: sympy

    cf = derive(p) if len({id(g) for g in head_groups}) == 1 and not p.inputs else None
    return Report(p.name, tgt.name, tgt.description, dtype, head_dim, batch, heads, p.n, plan.n_kernel,
                  plan.block_m, plan.block_n, "natural" if plan.order is None else "permuted", analytic,
                  {"dense": dense_tiles, "visited": visited, "full": full, "partial": partial}, pairs,
                  pairs / (heads * p.n * p.n), directions["forward"], directions["backward"],
                  cf.describe() if cf is not None else None, tuple(notes))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def _tile_seconds(tgt: Target, costs: PassCosts, dtype: str, head_dim: int, bm: int, bn: int) -> tuple[float, float]:
    """``(full tile seconds, fixed part)`` on one unit at ``head_dim``.

    The profile's efficiency is the dense kernel's at ``tgt.head_dim``; the part of a tile's
    time that is not the fixed cost scales with the head dim (it is matmul work).
    """
    rate = tgt.peak(dtype) / tgt.units
    ref = 4.0 * bm * bn * tgt.head_dim * costs.flop_ratio / (rate * costs.efficiency)
    fixed = min(costs.tile_fixed_ns * 1e-9, ref)
    return fixed + (ref - fixed) * head_dim / tgt.head_dim, fixed


@dataclass(frozen=True)
class PassWork:
    """The work of one kernel pass, per work item in launch order: a CTA on a GPU, one fused
    call over a chunk of query tiles (every head of a head group) on the CPU torch executor."""

    share: float  # fraction of a direction's tile work done in this pass
    full: np.ndarray  # full tiles per item
    partial: np.ndarray  # partial tiles per item
    padding: np.ndarray  # dummy slots per item (executors that pad ragged rows)
    masked: np.ndarray  # slots per item that pay the mask
    gathered: np.ndarray  # slots per item whose key tiles are gathered (CPU: no strided view)
    qtiles: np.ndarray  # query (or key) tiles per item: what the per-CTA overhead counts


def pass_work(plan: Plan, tgt: Target, direction: str, heads: int, batch: int = 1,
              dense: bool = False) -> list[PassWork]:
    """How the target's executor walks the plan: the passes of ``direction`` and their items.

    A pyramid (PSA) is walked by its pooled keys instead (:func:`_pyramid_work`).
    GPUs: the forward is one CTA per query tile; the backward a dK/dV pass (CTA per key tile,
    transposed tables) and a dQ pass. An executor with ``chunk_bytes`` (the CPU torch backend)
    instead makes one item per fused call: a chunk of query tiles of a head group, laid out
    exactly as the executor lays it (:mod:`attnlang.rows`: padded or sorted rows, windows read
    as strided views or gathered, a bias on chunks with a partial or dummy slot); its backward
    walks the same chunks. ``dense=True`` is the same backend's dense kernel: every tile full,
    natural order.
    """
    ex = tgt.executor
    nq, nk = -(-plan.n // plan.block_m), -(-plan.n // plan.block_n)
    if plan.levels is not None and not dense:
        return [_pyramid_work(plan, heads, batch, ex.chunk_bytes)]
    if ex.chunk_bytes:
        return [_chunk_work(plan, ex.chunk_bytes, heads, batch, dense)]
    if direction == "forward" or ex.backward == "query-major":
        specs = [(1.0, lambda g: (g.full.counts(), g.partial.counts()), nq, nk)]
    else:
        specs = [(DKDV_SHARE, lambda g: (g.full_t.counts(), g.partial_t.counts()), nk, nq),
                 (1 - DKDV_SHARE, lambda g: (g.full.counts(), g.partial.counts()), nq, nk)]
    out = []
    for share, counts_of, dense_ctas, dense_width in specs:
        if dense:
            n = dense_ctas * heads * batch
            z = np.zeros(n, dtype=np.int64)
            out.append(PassWork(share, np.full(n, dense_width, dtype=np.int64), z, z, z, z, np.ones_like(z)))
            continue
        per_head = {}
        for h in range(heads):
            g = plan.group_for_head(h)
            if id(g) not in per_head:
                f, p = counts_of(g)
                pad = (int((f + p).max(initial=0)) - f - p) if ex.pad_rows else np.zeros_like(f)
                masked = np.where((p > 0) | (pad > 0), f + p + pad, 0) if ex.mask_whole_row else p
                per_head[id(g)] = (f, p, pad, masked)
        # Launch order: batch, then heads, then tiles (the grid's fastest axis).
        cols = [np.concatenate([per_head[id(plan.group_for_head(h))][i] for h in range(heads)] * batch)
                for i in range(4)]
        out.append(PassWork(share, *cols, np.zeros_like(cols[0]), np.ones_like(cols[0])))
    return out


def _pyramid_work(plan: Plan, heads: int, batch: int, chunk_bytes: int = 0) -> PassWork:
    """A pyramid's work as its kernels do it: one item per (batch, head, query group, ``block_m``
    rows of the group), visiting the group's *pooled* keys in tiles of ``block_n`` — a key block
    at level ``l`` gives ``ceil(|block| / l)`` of them — every tile masked (visibility and the
    ``ln(l)`` bonus are per element): the programs of ``runtime/triton_pyramid.py``. A chunk
    executor (the CPU path, which buckets tiles of pooled keys into fused calls) gets items of
    about ``chunk_bytes`` of scores instead. The backward walks the same items."""
    pyr, layout = plan.pattern.attend, plan.pattern.layout
    (qids, nq), (kids, nb) = token_boxes(layout, pyr.query_block), token_boxes(layout, pyr.block)
    gsize, bsize = np.bincount(qids, minlength=nq), np.bincount(kids, minlength=nb)
    table = np.asarray(plan.levels)
    pooled = np.where(table > 0, -(-bsize // np.maximum(table, 1)), 0).sum(axis=-1)  # [H, groups]
    slots = -(-pooled // plan.block_n)
    ctas = -(-gsize // plan.block_m)
    per_head = [np.repeat(slots[min(h, len(slots) - 1)], ctas) for h in range(heads)]
    tiles = np.concatenate(per_head * batch).astype(np.int64)
    qtiles = np.ones_like(tiles)
    if chunk_bytes and len(tiles):  # consecutive items share a call up to chunk_bytes of scores
        call = np.cumsum(tiles) * plan.block_m * plan.block_n * 4 // chunk_bytes
        starts = np.flatnonzero(np.r_[True, call[1:] != call[:-1]])
        tiles, qtiles = np.add.reduceat(tiles, starts), np.add.reduceat(qtiles, starts)
    z = np.zeros_like(tiles)
    return PassWork(1.0, z, tiles, z, tiles, z, qtiles)


def _chunk_work(plan: Plan, chunk_bytes: int, heads: int, batch: int, dense: bool) -> PassWork:
    """One item per fused call of the CPU torch executor (see :func:`pass_work`)."""
    nq, nk = -(-plan.n // plan.block_m), -(-plan.n // plan.block_n)
    groups = [(dense_layout(nq, nk), heads)] if dense else _group_layouts(plan, heads)
    items = []
    for lay, hc in groups:
        for c0, c1 in chunks(lay, hc, plan.block_m, plan.block_n, chunk_bytes):
            slots = (c1 - c0) * lay.chunk_width(c0, c1)
            seen = int(lay.widths[c0:c1].sum())
            part = int(lay.partial[c0:c1].sum())
            # Counts over the chunk's hc heads: (full, partial, padding, masked, gathered, tiles).
            items.append([hc * x for x in (seen - part, part, slots - seen, slots if lay.masked(c0, c1) else 0,
                                           slots if lay.window_step(c0, c1) is None else 0, c1 - c0)])
    cols = np.array(items, dtype=np.int64).reshape(-1, 6)
    return PassWork(1.0, *(np.tile(cols[:, i], batch) for i in range(6)))


def _direction(plan, tgt, costs, tile_s, direction, heads, batch, dtype, head_dim,
               flop_bound, tile_bound, analytic) -> tuple[Direction, bool]:
    t_full, fixed = tile_s
    cta, call = costs.cta_overhead_ns * 1e-9, costs.chunk_overhead_ns * 1e-9
    gather = costs.gather_cost * _gather_scale(plan, tgt, heads, head_dim)
    idx = 0.0 if analytic else tgt.index_read_ns * 1e-9
    comp = dict.fromkeys(COMPONENTS, 0.0)
    dense_s = kernel_s = with_idx_s = 0.0

    def item_seconds(w: PassWork) -> np.ndarray:
        tf = t_full * w.share
        return (call + w.qtiles * cta + (w.full + w.partial + w.padding) * tf
                + w.masked * tf * costs.mask_cost + w.gathered * tf * gather)

    for dw in pass_work(plan, tgt, direction, heads, batch, dense=True):
        dense_s += _makespan(item_seconds(dw), tgt.units)
    for w in pass_work(plan, tgt, direction, heads, batch):
        tf, fx = t_full * w.share, fixed * w.share
        slots = w.full + w.partial + w.padding
        works = item_seconds(w)
        comp["full tiles"] += float(w.full.sum()) * (tf - fx)
        comp["partial tiles"] += float(w.partial.sum()) * (tf - fx)
        comp["row padding"] += float(w.padding.sum()) * (tf - fx)
        comp["mask"] += float(w.masked.sum()) * tf * costs.mask_cost
        comp["gather"] += float(w.gathered.sum()) * tf * gather
        comp["tile fixed"] += float(slots.sum()) * fx
        comp["CTA overhead"] += float(w.qtiles.sum()) * cta + len(works) * call
        span = _makespan(works, tgt.units)
        kernel_s += span
        with_idx_s += _makespan(works + (w.full + w.partial) * idx, tgt.units) if idx else span
    busy = sum(comp.values())
    comp = {k: v / tgt.units for k, v in comp.items()}
    comp["idle"] = max(kernel_s - busy / tgt.units, 0.0)
    overheads = {"permute": _permute_seconds(plan, tgt, dtype, head_dim, batch, heads, direction),
                 "index_tables": with_idx_s - kernel_s,
                 # Selection is not differentiated: the backward reuses the forward's decisions.
                 "routing": _routing_seconds(plan.pattern, tgt, dtype, head_dim, batch, heads)
                 if direction == "forward" else 0.0}
    time_s = kernel_s + sum(overheads.values())
    schedule = _ratio(dense_s, kernel_s)
    clamped = schedule > tile_bound
    schedule = min(schedule, tile_bound)
    predicted = min(_ratio(dense_s, time_s), schedule)
    return Direction(flop_bound, tile_bound, schedule, predicted, dense_s, kernel_s, time_s, overheads,
                     comp, clamped), clamped


def _gather_scale(plan: Plan, tgt: Target, heads: int, head_dim: int) -> float:
    """How much of the calibrated gather cost a plan pays: gathering key tiles copies K and V,
    which is cheaper while they sit in the cache, so the cost scales with the K/V working set
    (``N x heads x head_dim``) relative to the one it was calibrated at, up to 1. Profiles
    without a calibration record (GPU ones, whose gather cost is 0) pay it whole."""
    cal = tgt.calibration
    try:
        ref = int(cal["n"]) * int(cal["heads"]) * int(cal["head_dim"])
    except (TypeError, KeyError, ValueError):
        return 1.0
    return min(1.0, plan.n * heads * head_dim / max(ref, 1))


def _makespan(works: np.ndarray, units: int) -> float:
    """Greedy list scheduling of CTAs in launch order onto ``units`` SMs (what the hardware does)."""
    if len(works) == 0:
        return 0.0
    if units == 1:
        return float(works.sum())
    if len(works) <= units:
        return float(works.max())
    if works.min() == works.max():
        return math.ceil(len(works) / units) * float(works[0])
    heap = works[:units].tolist()
    heapq.heapify(heap)
    for w in works[units:].tolist():
        heapq.heapreplace(heap, heap[0] + w)
    return max(heap)


def _permute_seconds(plan: Plan, tgt: Target, dtype: str, head_dim: int, batch: int, heads: int,
                     direction: str = "forward") -> float:
    """Moving tokens between the user's order and kernel order, each tensor read and written once
    at the target's bandwidth: Q, K, V gathered and O scattered in the forward; Q, K, V, O, dO
    gathered and dQ, dK, dV scattered in the backward. A chunk executor that sorts a head
    group's uneven rows (:mod:`attnlang.rows`) moves the query-side tensors alone (Q, O; and
    dO, dQ in the backward) for the heads of such groups."""
    tensors, query_side = (4, 2) if direction == "forward" else (8, 4)
    per_head = 2 * batch * plan.n_kernel * head_dim * DTYPE_BYTES[dtype] / (tgt.bandwidth_gbs * 1e9)
    if plan.order is not None:
        return tensors * heads * per_head
    if not tgt.executor.chunk_bytes:
        return 0.0
    return query_side * per_head * sum(hc for lay, hc in _group_layouts(plan, heads) if lay.q_perm is not None)


def _group_layouts(plan: Plan, heads: int) -> list:
    """``[(RowLayout, heads in the group)]``: each head group of the first ``heads`` heads as the
    CPU executor lays it out (:mod:`attnlang.rows`); it runs a group's heads in one call."""
    count: dict[int, list] = {}
    for h in range(heads):
        g = plan.group_for_head(h)
        count.setdefault(id(g), [g, 0])[1] += 1
    return [(row_layout(g.full, g.partial), hc) for g, hc in count.values()]


def _routing_seconds(p, tgt: Target, dtype: str, head_dim: int, batch: int, heads: int) -> float:
    """The routing stage of a pattern that reads Q/K (docs/language.md §13), per call, forward only.

    Per batch item and query head: pooling reads Q and K once (``2 N D`` elements); the block
    scores are ``groups x blocks`` dot products of length ``D`` (``2 G nb D`` FLOPs); selection
    sorts every group's scores (``G nb log2 nb`` fp32 reads). ``permute_keys`` (PBS-Attn) adds
    the importance scores of the last query block against every key (``2 B N D`` FLOPs) and a
    gather of K and V into the permuted order; a pyramid adds one pooled copy of K and V per
    level above 1. Bytes go at the profile's bandwidth, FLOPs at its dense forward rate.
    """
    if not p.reads_content:
        return 0.0
    n, D, eb = p.n, head_dim, DTYPE_BYTES[dtype]
    rate = tgt.peak(dtype) * tgt.forward.efficiency
    bw = tgt.bandwidth_gbs * 1e9
    nbytes = flops = 0.0
    if isinstance(p.attend, Pyramid):
        stages = [(token_boxes(p.layout, p.attend.query_block)[1], token_boxes(p.layout, p.attend.block)[1], None)]
        # Pooled K and V per level l > 1: read both, write 1/l of them.
        nbytes += sum(2 * n * D * eb * (1 + 1 / lv) for lv in set(p.attend.levels) if lv > 1)
    else:
        stages = [(r.groups(p.layout), r.blocks(p.layout), r) for r in routes(p)]
    for groups, blocks, r in stages:
        nbytes += 2 * n * D * eb + 4 * groups * blocks * max(1.0, math.log2(max(blocks, 2)))
        flops += 2 * groups * blocks * D
        if r is not None and r.permute is not None:
            flops += 2 * min(r.block[0], n) * n * D
            nbytes += 2 * 2 * n * D * eb  # K and V gathered into the permuted order
    return batch * heads * (nbytes / bw + flops / rate)


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One size of a sweep: the parameter value and the forward/backward bounds there."""

    value: int
    n: int
    flop_bound: float
    tile_bound: float
    schedule_bound: float
    predicted: float
    backward_predicted: float
    time_s: float


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """``N=1k..1M`` -> ``("N", [1024, 2048, ..., 1048576])`` (doubling; k = 1024, M = 1024^2).

    >>> parse_sweep("r=64..512")
    ('r', [64, 128, 256, 512])
    """
    name, sep, rng = text.partition("=")
    lo_s, dots, hi_s = rng.partition("..")
    if not sep or not name.strip().isidentifier() or not dots:
        raise AttnError(f"--sweep {text!r} must look like NAME=LO..HI", hint="e.g. --sweep N=1k..1M")
    lo, hi = _size(lo_s, text), _size(hi_s, text)
    if lo < 1 or hi < 1:
        raise AttnError(f"--sweep {text!r}: sizes must be positive, got {lo}..{hi}")
    if lo > hi:
        raise AttnError(f"--sweep {text!r}: the range is empty (lo {lo} > hi {hi})",
                        hint=f"write {name.strip()}={hi_s.strip()}..{lo_s.strip()}")
    values = []
    v = lo
    while v < hi:
        values.append(v)
        v *= 2
    return name.strip(), values + [hi]


def _size(s: str, whole: str) -> int:
    s = s.strip()
    mult = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}.get(s[-1:], 1)
    digits = s[:-1] if mult > 1 else s
    if not digits.isdigit():
        raise AttnError(f"--sweep {whole!r}: {s!r} is not a size",
                        hint="sizes are integers, optionally with k (x1024) or M (x1024^2), e.g. 4k")
    return int(digits) * mult


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def json_safe(x: Any) -> Any:
    """``x`` with infinite and NaN floats as ``None`` (JSON has neither), in nested dicts/lists."""
    if isinstance(x, float):
        return None if math.isinf(x) or math.isnan(x) else x
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def format_speedup(v: float) -> str:
    """A speedup as a report shows it: ``2.50x``, or ``inf``."""
    return "inf" if math.isinf(v) else f"{v:.2f}x"


def format_time(s: float) -> str:
    """Seconds with a readable unit: ``1.5 ms``, ``320 us``."""
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _share(part: float, total: float) -> str:
    return f"{100 * part / total:.1f}%" if total else "-"


__all__ = ["COMPONENTS", "Direction", "PassWork", "pass_work", "Report", "SCHEMA", "SweepPoint", "format_speedup",
           "format_time", "json_safe", "parse_sweep", "sample_content", "simulate_pattern", "simulate_plan", "simulate_ranks"]


def simulate_ranks(plan: Plan, ranks: int, target: "str | Target" = "h100", *, report: Report | None = None,
                   dtype: str | None = None, head_dim: int = 128, batch: int = 1, heads: int | None = None,
                   kv_heads: int | None = None, content: Mapping[Any, np.ndarray] | None = None):
    """Context parallelism over ``ranks`` ranks (``attnlang simulate --ranks``): per-rank work and
    imbalance, bytes moved against a K/V all-gather, and the step time at the target's
    interconnect bandwidth (:mod:`attnlang.distributed.report`). Routed plans: pass the
    ``content`` they were made with (or a ``report``).

    >>> from attnlang import make_plan, causal, sliding
    >>> r = simulate_ranks(make_plan(causal & sliding(4096), tokens=1 << 16), 8)
    >>> r.imbalance < 1.05, max(r.forward_bytes) < max(r.all_gather_bytes) / 4
    (True, True)
    """

    tgt = load_target(target)
    dtype = dtype or ("bf16" if tgt.kind == "gpu" else "fp32")
    heads = heads if heads is not None else (plan.pattern.heads or 8)
    report = report or simulate_plan(plan, tgt, dtype=dtype, head_dim=head_dim, batch=batch, heads=heads,
                                     content=content)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise AttnError(f"ranks = {ranks!r} must be a positive integer")
    kv = kv_heads or heads
    # Receiving one key tile of one head (K and V) in units of one full tile of one head: what the
    # sharding trades against compute (TileCost.comm).
    tile_s = report.forward.dense_s / max(report.tiles["dense"], 1) / batch
    link = tgt.interconnect_gbs or _packaged_interconnect(tgt.name)
    bw = (link or 0.0) * 1e9
    comm = (plan.block_n * 2 * head_dim * DTYPE_BYTES[dtype] * kv / heads / bw) / tile_s if bw else TileCost.comm
    unit, routed = None, plan.pattern.reads_content and plan.levels is None
    if routed:  # units hold whole key blocks and query groups, as ContextParallel shards them
        unit = math.lcm(*(math.lcm(r.block[0], r.query_block[0]) for r in routes(plan.pattern)))
    sh = shard(plan, ranks, heads=heads, cost=TileCost(partial=1 + tgt.forward.mask_cost, comm=comm),
               unit=unit, routed=routed)
    return rank_report(sh, report.forward.time_s, report.backward.time_s, kv_heads=kv, head_dim=head_dim,
                       batch=batch, dtype_bytes=DTYPE_BYTES[dtype], interconnect_gbs=link)


def _packaged_interconnect(name: str) -> float | None:
    """The packaged profile's interconnect figure, for a user profile without one (a profile
    written by ``attnlang calibrate`` measures the machine, not its links)."""
    path = PACKAGED / f"{name}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["interconnect_gbs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
