"""``ContextParallel``: one attention call spread over the ranks of a ``torch.distributed`` group.

Semantics: with ``cp = ContextParallel(spec)``, every rank holding the same full ``q, k, v``,

    cp.unshard(cp(cp.shard(q), cp.shard(k), cp.shard(v)))  ==  attnlang.compile(spec)(q, k, v)

and gradients flow through all three (``shard``'s backward all-gathers the local gradients;
``unshard``'s backward keeps this rank's part, assuming — as tensor-parallel code does — that
what follows ``unshard`` is computed identically on every rank).

A call, on every rank:

1. **agree** — one ``all_gather`` of a 32-byte record: a digest of the pattern, its parameters,
   shapes, scale and runtime inputs, and this rank's own verdict on its arguments (shard
   length, shapes). Any mismatch raises the same :class:`AttnError` on every rank, before any
   collective whose sizes depend on the arguments (so nothing hangs).
2. **exchange** — an asynchronous ``all_to_all_single`` moves exactly the K/V tiles of the
   :class:`~attnlang.distributed.Sharding` (each to each rank that reads it, once); meanwhile
   the rank attends its query tiles to the key tiles it owns.
3. **remote tiles** — then to the received tiles; the two partial results merge by log-sum-exp.
4. **backward** — gradients of the remote tiles first, whose dK/dV partial sums go back to
   their owners (``all_to_all_single``, asynchronous) while the local tiles' gradients are
   computed; owners add the partials in a fixed order (own, then rank 0, 1, ...):
   deterministic.

Routed patterns (1-D ``route`` with ``scope = query``: MoBA) own whole key blocks per rank; each
call all-reduces the pooled K (one owner per block), selects for this rank's own query groups,
and all-gathers bitmaps of the needed key tiles, which become that call's receive lists.

The attention math per chunk of query tiles is the plan-driven executor's: gathered key tiles,
an additive ``0 / -inf`` bias on partial tiles (the IR's ``allowed`` on the tile's tokens), fp32
softmax; the backward recomputes probabilities from the saved log-sum-exp.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

import attnlang
from attnlang.distributed.shard import Sharding, TileCost, group_heads, shard, tile_rows
from attnlang.errors import AttnError
from attnlang.inputs import by_keyword, check_inputs
from attnlang.pattern import Env, Pattern, Pyramid
from attnlang.planner import make_plan
from attnlang.routing import block_ids, eligibility, group_ids, routes, select
from attnlang.runtime.call import check_call
from attnlang.runtime.chunks import chunk_backward, chunk_forward
from attnlang.runtime.routing import segment_mean
from attnlang.runtime.tiles import partial_masks
from attnlang.simulate import sample_content

CHUNK_BYTES = 4 << 20  # fp32 scores per head per chunk of query tiles
RECORD = 4  # int64 words of the agreement record: status, local length given, expected, digest


class ContextParallel:
    """Context-parallel attention over ``group`` (default: the whole world).

    ``spec``, ``pattern``, ``tokens``, ``heads`` and ``**params`` are what
    :func:`attnlang.compile` takes; ``block_m`` / ``block_n`` fix the tile sizes (else the
    planner's); ``cost`` the sharding's cost weights (:class:`~attnlang.distributed.TileCost`).

    >>> cp = ContextParallel("examples/swa.attn", N=65536)            # doctest: +SKIP
    >>> y = cp.unshard(cp(cp.shard(q), cp.shard(k), cp.shard(v)))      # doctest: +SKIP
    """

    def __init__(self, spec: Any, pattern: str | None = None, group: Any = None, *, tokens: Any = None,
                 heads: int | None = None, block_m: int | None = None, block_n: int | None = None,
                 cost: TileCost | None = None, **params: Any):
        if not dist.is_available() or not dist.is_initialized():
            raise AttnError("ContextParallel needs an initialised torch.distributed process group",
                            hint="call torch.distributed.init_process_group(...) first (torchrun sets "
                                 "the environment; backend 'gloo' on CPU, 'nccl' on GPU)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._compiled = attnlang.compile(spec, pattern, tokens=tokens, heads=heads, **params)
        self._blocks = (block_m, block_n)
        self._cost = cost or TileCost()
        self._layouts: dict[tuple, _Layout] = {}
        self._last: _Layout | None = None
        self._pending: _Layout | None = None  # this call's layout, known before its checks fail
        # Routed patterns: the latest call's sharding (same ownership, this call's receive lists).
        self.routed_sharding: Sharding | None = None
        self.stats: dict[str, int] = {"forward_bytes": 0, "backward_bytes": 0}  # sent by this rank

    # -- the public three -------------------------------------------------------------------
    def shard(self, x: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """This rank's part of a full ``[B, H, N, D]`` tensor, in the sharding's token order.

        Patterns with runtime inputs shard by them: pass the same inputs as to the call.
        """
        _check_4d("x", x)
        lay = self._layout_for(x.shape[2], x.shape[0], inputs)
        return _Scatter.apply(x, lay, self)

    def unshard(self, y: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """All ranks' parts back to the full ``[B, H, N, D]`` tensor, in the user's order
        (``[B, H, n]`` parts, such as ``lse``, give ``[B, H, N]``).

        Without ``inputs`` a runtime-input pattern uses the sharding of the latest call.
        """
        if isinstance(y, torch.Tensor) and y.dim() == 3:
            return self.unshard(y.unsqueeze(-1), **inputs).squeeze(-1)
        _check_4d("y", y)
        lay = self._last if not inputs and self._last is not None else None
        if lay is None:
            n = self._only_length()
            lay = self._layout_for(n, y.shape[0], inputs)
        if y.shape[2] != lay.local_n:
            raise AttnError(f"rank {self.rank}: unshard got {y.shape[2]} tokens, its shard holds {lay.local_n}")
        return _Gather.apply(y, lay, self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 return_lse: bool = False, **inputs: Any):
        """This rank's output part ``[B, Hq, n_local, D]`` (and ``lse [B, Hq, n_local]`` fp32)."""
        lay, problem, digest = None, None, b""
        self._pending = None
        try:
            lay, scale, digest = self._prepare(q, k, v, scale, inputs)
        except Exception as e:  # any failure: every rank must still reach the agreement
            problem = str(e) if isinstance(e, AttnError) else f"{type(e).__name__}: {e}"
        self._agree(problem, digest, q, lay or self._pending)
        self._last = lay
        if lay.pattern.reads_content:  # this call's selection decides the tiles and the exchange
            lay = self._routed_layout(lay, q, k, scale, inputs)
            self.routed_sharding = lay.sharding
        out, lse = _CPAttention.apply(q, k, v, lay, scale, self)
        return (out, lse) if return_lse else out

    def sharding(self, n: int | None = None, **inputs: Any) -> Sharding:
        """The :class:`Sharding` for sequence length ``n`` (and runtime inputs)."""
        n = self._only_length() if n is None else n
        return self._layout_for(n, 1 if not inputs else _batch_of(inputs), inputs).sharding

    # -- internals --------------------------------------------------------------------------
    def _only_length(self) -> int:
        try:
            return self._compiled.pattern.n
        except AttnError:
            if self._last is not None:
                return self._last.pattern.n
            raise AttnError("this pattern's length binds from the tensors: call shard(x) first") from None

    def _layout_for(self, n: int, batch: int, inputs: Mapping[str, Any]) -> "_Layout":
        pattern = self._compiled.pattern_for(n)
        if pattern.reads_content:
            _routed_check(pattern)
        declared = [i.name for i in pattern.inputs]
        if declared and not inputs:
            if self._last is not None and self._last.pattern is pattern:
                return self._last
            raise AttnError(f"pattern '{pattern.name}' reads runtime input(s) {declared}: its sharding "
                            "depends on them", hint=f"pass them to shard() too: cp.shard(x, {declared[0]}=...)")
        items = _item_inputs(pattern, inputs, batch)
        key = (id(pattern), _digest_items(items))
        lay = self._layouts.get(key)
        if lay is None:
            lay = _Layout.build(pattern, items, self.world_size, self.rank, self._blocks, self._cost)
            if len(self._layouts) >= 16:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = lay
        self._last = lay
        return lay

    def _prepare(self, q, k, v, scale, inputs):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_4d(name, t)
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise AttnError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise AttnError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if not q.shape[3] == k.shape[3] == v.shape[3]:  # the exchange packs K and V of one head dim
            raise AttnError(f"ContextParallel needs one head dim for q, k and v, got {q.shape[3]}, {k.shape[3]}, "
                            f"{v.shape[3]}", hint="for Dv != D (MLA) run attnlang.compile(spec) on one device, "
                                                  "or pad v to q's head dim and slice the output")
        lay = self._pending = self._layout_for(self._only_length(), q.shape[0], inputs)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[2] != lay.local_n:
                raise AttnError(f"rank {self.rank}: {name} has {t.shape[2]} tokens but this rank's shard "
                                f"holds {lay.local_n} (N = {lay.pattern.n} over {self.world_size} ranks)",
                                hint="pass cp.shard(x) of the full tensor")
        full = lambda t: torch.zeros((), dtype=t.dtype).expand(t.shape[0], t.shape[1], lay.pattern.n, t.shape[3])  # noqa: E731
        call = check_call(lay.pattern, full(q), full(k), full(v), scale, inputs, None)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(lay.pattern.to_attn().encode())
        digest.update(repr((self.world_size, tuple(q.shape[:2]), tuple(k.shape[:2]), q.shape[3],
                            str(q.dtype), call.scale, self._blocks, self._cost)).encode())
        for name, t in sorted(call.inputs.items()):
            digest.update(name.encode() + t.numpy().tobytes())
        return lay, call.scale, digest.digest()

    def _routed_layout(self, lay: "_Layout", q, k, scale: float, inputs) -> "_Layout":
        """Route this call: pooled K of every key block from its owner (an all_reduce of a small
        ``[B, Hkv, blocks, D]`` tensor), selection for this rank's own query groups, plans for its
        own query tiles, then one all_gather of every rank's needed key tiles: the exchange."""
        from dataclasses import replace

        pattern, sh = lay.pattern, lay.sharding
        B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
        dev = q.device
        mine = torch.from_numpy(lay.tokens[self.rank]).to(dev)
        kv_of = torch.arange(Hq, device=dev) // (Hq // Hkv)
        items = lay.item_inputs if len(lay.item_inputs) == B else lay.item_inputs * B
        contents, plans = [], []
        with torch.no_grad():
            for b in range(B):
                content = {}
                for r in routes(pattern):
                    G, nb = r.groups(pattern.layout), r.blocks(pattern.layout)
                    kid = torch.from_numpy(block_ids(r, pattern.layout)).to(dev)[mine]
                    gid_np = group_ids(r, pattern.layout)[lay.tokens[self.rank]]
                    kmean = segment_mean(k[b], kid, nb)  # blocks this rank owns, zeros elsewhere
                    dist.all_reduce(kmean, group=self.group)  # each block has one owner: exact
                    self.stats["routing_bytes"] = self.stats.get("routing_bytes", 0) + kmean.numel() * 4
                    my_groups = np.unique(gid_np)
                    local_gid = np.searchsorted(my_groups, gid_np)
                    qmean = segment_mean(q[b], torch.from_numpy(local_gid).to(dev), len(my_groups))
                    scores = np.einsum("hgd,hbd->hgb", qmean.cpu().numpy(), kmean[kv_of].cpu().numpy()
                                       ).astype(np.float32) * np.float32(scale)
                    elig = eligibility(r, pattern.layout)[my_groups][None]
                    sel = np.zeros((Hq, G, nb), dtype=bool)
                    sel[:, my_groups] = select(r, scores, elig)
                    content[r] = sel
                contents.append(content)
                plans.append(make_plan(pattern, inputs=items[b] or None, block_m=sh.block_m, block_n=sh.block_n,
                                       content=content))
        # Needed key tiles of this rank's query tiles (its rows are all it routed), then everyone's.
        my_q = sh.q_tiles_of(self.rank)
        need = np.zeros(sh.kv_tiles, dtype=np.uint8)
        for plan in plans:
            for gi in range(len(plan.groups)):
                fq, fk, pq, pk = tile_rows(plan, gi)
                rows = np.isin(np.concatenate([fq, pq]), my_q)
                need[np.concatenate([fk, pk])[rows]] = 1
        got = [torch.zeros(sh.kv_tiles, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(got, torch.from_numpy(need), group=self.group)
        owner = sh.kv_owner()
        needs = [g.numpy().astype(bool) for g in got]
        recv = tuple(tuple(np.nonzero(needs[r] & (owner == s) & (r != s))[0] for s in range(self.world_size))
                     for r in range(self.world_size))
        return _Layout.from_sharding(pattern, replace(sh, recv=recv), tuple(plans), items, self.rank, Hq,
                                     contents)

    def _agree(self, problem: str | None, digest: bytes, q, lay) -> None:
        """One all_gather of every rank's verdict and digest; the same AttnError on every rank."""
        rec = torch.zeros(RECORD, dtype=torch.int64)
        rec[0] = 1 if problem else 0
        rec[1] = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else -1
        rec[2] = lay.local_n if lay is not None else -1
        if digest:
            rec[3] = int.from_bytes(digest[:8], "little", signed=True)
        got = [torch.zeros_like(rec) for _ in range(self.world_size)]
        dev = q.device if isinstance(q, torch.Tensor) and dist.get_backend(self.group) == "nccl" else None
        if dev is not None:
            rec, got = rec.to(dev), [g.to(dev) for g in got]
        dist.all_gather(got, rec, group=self.group)
        got = [g.cpu() for g in got]
        bad = [r for r, g in enumerate(got) if int(g[0])]
        if problem:
            raise AttnError(problem)
        if bad:
            what = ", ".join(f"rank {r} (gave {int(got[r][1])} tokens, its shard holds {int(got[r][2])})"
                             for r in bad)
            raise AttnError(f"rank {self.rank}: the call failed on {what}; no rank ran it")
        digests = [int(g[3]) for g in got]
        if len(set(digests)) > 1:
            groups: dict[int, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            parts = "; ".join(f"ranks {v}" for v in groups.values())
            raise AttnError(f"rank {self.rank}: the ranks disagree on the pattern, its parameters, shapes, "
                            f"scale or runtime inputs (groups that agree: {parts})",
                            hint="every rank must build ContextParallel with the same spec and call it "
                                 "with the same inputs and shapes")


def _routed_check(pattern: Pattern) -> None:
    """Routed patterns run when every route is one ContextParallel can split exactly."""

    why = None
    if isinstance(pattern.attend, Pyramid):
        why = "pyramid(...) patterns"
    elif pattern.layout.rank != 1:
        why = "routes on multi-dimensional layouts"
    else:
        for r in routes(pattern):
            if r.scope != "query":
                why = "route(..., scope = head)"
            elif r.permute is not None:
                why = "route(..., permute_keys = importance(...))"
    if why:
        raise AttnError(f"pattern '{pattern.name}': context parallelism does not run {why} yet",
                        hint="run it with attnlang.compile on one device per sequence; 1-D routes with "
                             "scope = query (MoBA) are supported")


def _routed_static(pattern: Pattern):
    """``(content, unit)`` for sharding a routed pattern: a seeded representative selection
    (every rank draws the same) for the costs, and units that hold whole key blocks and query
    groups, so each block's pooled K has one owner."""
    import math

    unit = 1
    for r in routes(pattern):
        unit = math.lcm(unit, r.block[0], r.query_block[0])
    return sample_content(pattern, 1, 16), unit


def _check_4d(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttnError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
    if t.dim() != 4:
        raise AttnError(f"{name} must have 4 dimensions [B, H, N, D], got shape {tuple(t.shape)}")


def _batch_of(inputs: Mapping[str, Any]) -> int:
    for v in inputs.values():
        a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        if a.ndim == 2:
            return a.shape[0]
    return 1


def _item_inputs(pattern: Pattern, inputs: Mapping[str, Any], batch: int) -> tuple[dict[str, np.ndarray], ...]:
    """Per batch item numpy inputs (one entry when every item has the same), validated."""
    got = check_inputs(pattern, inputs, batch=batch, spell=by_keyword)
    items = [{k: a[min(b, a.shape[0] - 1)] for k, a in got.items()} for b in range(batch)]
    same = all(all(np.array_equal(it[k], items[0][k]) for k in it) for it in items[1:])
    return (items[0],) if same else tuple(items)


def _digest_items(items) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for it in items:
        for k, v in sorted(it.items()):
            h.update(k.encode() + np.ascontiguousarray(v, dtype=np.int64).tobytes())
    return h.digest()


# --------------------------------------------------------------------------------------------
# Per-rank layout: the sharding, the exchange indices and the local tile schedules
# --------------------------------------------------------------------------------------------

@dataclass
class _Phase:
    """Query tiles x slots of one phase (own key tiles or received ones) of one head group."""

    slots: torch.Tensor  # int64 [T, W]: buffer key tile per slot (dummies read tile 0)
    bias_id: torch.Tensor  # int64 [T, W]: 0 full, 1 dummy, 2 + j partial j
    bias: torch.Tensor  # fp32 [2 + P, BM, BN]
    row_any: torch.Tensor  # bool [T * BM]: rows that see some key in this phase
    chunks: list[tuple[int, int, int]]  # (c0, c1, width)


@dataclass
class _Layout:
    pattern: Pattern
    sharding: Sharding
    rank: int
    plans: tuple  # per batch item (or one shared)
    local_n: int
    q_index: torch.Tensor  # int64 [T * BM]: local kernel row -> local token (local_n = zero)
    q_rows: torch.Tensor  # int64 [local_n]: local token -> local kernel row
    send_index: torch.Tensor  # int64: local tokens sent, destinations in rank order
    send_splits: list[int]
    recv_splits: list[int]
    kv_index: torch.Tensor  # int64 [S * BN]: buffer position -> row of cat(local, received, zero)
    own_tiles: int  # buffer tiles 0..own_tiles are this rank's; the rest were received
    phases: dict  # (item, group) -> (lo, hi, [own _Phase, remote _Phase])
    tokens: list  # per rank: token indices of its part
    _dev: dict
    item_inputs: tuple = ()  # per batch item runtime inputs (numpy), or one shared entry

    @staticmethod
    def build(pattern, items, world_size, rank, blocks, cost) -> "_Layout":
        bm, bn = blocks
        content, unit = None, None
        if pattern.reads_content:  # routed: ownership from a representative selection (below)
            content, unit = _routed_static(pattern)
        first = make_plan(pattern, inputs=items[0] or None, block_m=bm, block_n=bn, content=content)
        plans = (first,) + tuple(make_plan(pattern, inputs=it, block_m=first.block_m, block_n=first.block_n,
                                           content=content) for it in items[1:])
        sh = shard(plans, world_size, heads=pattern.heads, cost=cost, unit=unit, routed=content is not None)
        return _Layout.from_sharding(pattern, sh, plans, items, rank, pattern.heads or 1,
                                     None if content is None else (content,) * len(plans))

    @staticmethod
    def from_sharding(pattern, sh: Sharding, plans, items, rank, heads, contents) -> "_Layout":
        """The layout of ``rank`` for a sharding and the plans (per batch item) it runs;
        ``contents``: per batch item routing content (routed patterns), else None."""
        world_size = sh.world_size
        bn = sh.block_n
        tokens = [sh.tokens(r) for r in range(world_size)]
        mine = tokens[rank]
        local = np.full(pattern.n + 1, -1, dtype=np.int64)
        local[mine] = np.arange(len(mine))
        pos = sh.order[sh.positions(rank)]
        q_index = np.where(pos >= 0, local[np.maximum(pos, 0)], len(mine))
        q_rows = np.nonzero(pos >= 0)[0]

        sends = [sh.tile_tokens(sh.recv[d][rank]) for d in range(world_size)]
        send_index = np.concatenate([local[t] for t in sends]) if sends else np.zeros(0, np.int64)
        recv = [sh.tile_tokens(sh.recv[rank][s]) for s in range(world_size)]
        recv_splits = [len(t) for t in recv]
        # Buffer: own key tiles ascending, then received tiles (source rank order, ascending).
        kv_owner = sh.kv_owner()
        own = np.nonzero(kv_owner == rank)[0]
        far = [sh.recv[rank][s] for s in range(world_size)]
        buf_tiles = np.concatenate([own] + list(far)).astype(np.int64)
        buf_of = np.full(sh.kv_tiles, -1, dtype=np.int64)
        buf_of[buf_tiles] = np.arange(len(buf_tiles))
        recv_row = np.full(pattern.n, -1, dtype=np.int64)
        rt = np.concatenate(recv) if recv else np.zeros(0, np.int64)
        recv_row[rt] = len(mine) + np.arange(len(rt))
        bpos = sh.order[(buf_tiles[:, None] * bn + np.arange(bn)).reshape(-1)]
        zero = len(mine) + len(rt)
        src = np.where(np.arange(len(bpos)) < len(own) * bn, local[np.maximum(bpos, 0)],
                       recv_row[np.maximum(bpos, 0)])
        kv_index = np.where(bpos >= 0, src, zero)
        assert (kv_index >= 0).all()

        my_q = sh.q_tiles_of(rank)
        q_local = np.full(sh.q_tiles, -1, dtype=np.int64)
        q_local[my_q] = np.arange(len(my_q))
        phases = {}
        for b, plan in enumerate(plans):
            for gi, lo, hi in group_heads(plan, heads):
                g = plan.groups[gi]
                content = contents[b] if contents is not None else {}
                phases[(b, gi)] = (g.lo, g.hi, _phases(plan, gi, items[b if len(items) > 1 else 0], sh, rank,
                                                        q_local, my_q, buf_of, kv_owner, content))
        return _Layout(pattern, sh, rank, plans, len(mine), torch.from_numpy(q_index), torch.from_numpy(q_rows),
                       torch.from_numpy(send_index), [len(t) for t in sends], recv_splits,
                       torch.from_numpy(kv_index), len(own), phases, tokens, {}, tuple(items))

    def phases_on(self, dev) -> dict:
        """``phases`` with their index and bias tensors on ``dev`` (moved once per device)."""
        if dev.type == "cpu":
            return self.phases
        key = str(dev)
        if key not in self._dev:
            move = lambda ph: _Phase(ph.slots.to(dev), ph.bias_id.to(dev), ph.bias.to(dev),  # noqa: E731
                                     ph.row_any.to(dev), ph.chunks)
            self._dev[key] = {k: (lo, hi, [move(ph) for ph in phs]) for k, (lo, hi, phs) in self.phases.items()}
        return self._dev[key]

    def q_tiles(self) -> int:
        return len(self.q_index) // self.sharding.block_m

    def buffer_tiles(self) -> int:
        return len(self.kv_index) // self.sharding.block_n


def _phases(plan, gi, inputs, sh: Sharding, rank, q_local, my_q, buf_of, kv_owner, content) -> list[_Phase]:
    fq, fk, pq, pk = tile_rows(plan, gi)
    bm, bn = sh.block_m, sh.block_n
    T = len(my_q)
    expr = plan.pattern.expr_for_head(plan.groups[gi].lo)
    env = Env(plan.pattern.layout, dict(inputs), plan.groups[gi].lo, content)
    out = []
    for own in (True, False):
        sel_f = (q_local[fq] >= 0) & ((kv_owner[fk] == rank) == own)
        sel_p = (q_local[pq] >= 0) & ((kv_owner[pk] == rank) == own)
        f_q, f_k, p_q, p_k = fq[sel_f], fk[sel_f], pq[sel_p], pk[sel_p]
        rows = np.concatenate([q_local[f_q], q_local[p_q]])
        cols = np.concatenate([buf_of[f_k], buf_of[p_k]])
        assert (cols >= 0).all(), "a needed key tile is neither owned nor received"
        ids = np.concatenate([np.zeros(len(f_q), np.int64), 2 + np.arange(len(p_q))])
        counts = np.bincount(rows, minlength=T)
        width = max(int(counts.max(initial=0)), 1)
        order = np.argsort(rows, kind="stable")
        rows, cols, ids = rows[order], cols[order], ids[order]
        col = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        slots = np.zeros((T, width), np.int64)
        bias_id = np.ones((T, width), np.int64)
        slots[rows, col], bias_id[rows, col] = cols, ids
        allow = partial_masks(plan, expr, env, sh.order, sh.order, p_q, p_k)
        bias = np.zeros((2 + len(p_q), bm, bn), np.float32)
        bias[1] = -np.inf
        bias[2:][~allow] = -np.inf
        row_any = np.zeros((T, bm), bool)
        row_any[np.unique(q_local[f_q])] = True
        if len(p_q):
            np.logical_or.at(row_any, q_local[p_q], allow.any(axis=2))
        out.append(_Phase(torch.from_numpy(slots), torch.from_numpy(bias_id), torch.from_numpy(bias),
                          torch.from_numpy(row_any.reshape(-1)), _chunk(counts, bm, bn)))
    return out


def _chunk(counts: np.ndarray, bm: int, bn: int) -> list[tuple[int, int, int]]:
    """Chunks ``(c0, c1, width)`` of consecutive query tiles that visit something in the phase,
    with about CHUNK_BYTES of fp32 scores per head each (tiles visiting nothing are skipped)."""
    out: list[tuple[int, int, int]] = []
    budget = max(CHUNK_BYTES // (4 * bm * bn), 1)
    c0, width = None, 0
    for t, c in enumerate(counts.tolist() + [0]):
        if c0 is not None and (c == 0 or (t + 1 - c0) * max(width, c) > budget):
            out.append((c0, t, width))
            c0, width = None, 0
        if c > 0:
            c0 = t if c0 is None else c0
            width = max(width, c)
    return out


def _gather(ph: _Phase, kb, vb, c0, c1, w, bn):
    """Key/value tiles ``[H, c, W*BN, D]`` and bias ``[1, c, BM, W*BN]`` of query tiles c0..c1."""
    H, D = kb.shape[0], kb.shape[-1]
    c = c1 - c0
    idx = ph.slots[c0:c1, :w].reshape(-1)
    kg = kb.view(H, -1, bn, D).index_select(1, idx).view(H, c, w * bn, D)
    vg = vb.view(H, -1, bn, D).index_select(1, idx).view(H, c, w * bn, D)
    bid = ph.bias_id[c0:c1, :w]
    bias = None
    if bool((bid > 0).any()):
        bm = ph.bias.shape[1]
        bias = ph.bias.index_select(0, bid.reshape(-1)).view(c, w, bm, bn).transpose(1, 2).reshape(1, c, bm, w * bn)
    return idx, kg, vg, bias


def _heads(lo: int, hi: int | None, Hq: int, Hkv: int, device):
    hi = Hq if hi is None else hi
    return lo, hi, torch.arange(lo, hi, device=device) // (Hq // Hkv)


def _attend_phase(ph: _Phase, qk, kb, vb, scale, bm, bn):
    """``(out [H, T*BM, D], raw lse [H, T*BM])`` of one phase; ``qk [H, T*BM, D]``."""
    H, D = qk.shape[0], qk.shape[-1]
    out = torch.zeros_like(qk)
    lse = qk.new_zeros(qk.shape[:2])
    for c0, c1, w in ph.chunks:
        _, kg, vg, bias = _gather(ph, kb, vb, c0, c1, w, bn)
        qc = qk[:, c0 * bm:c1 * bm].reshape(H, c1 - c0, bm, D)
        o, l = chunk_forward(qc, kg, vg, bias, scale)
        out[:, c0 * bm:c1 * bm] = o.reshape(H, -1, D)
        lse[:, c0 * bm:c1 * bm] = l.reshape(H, -1)
    return out, lse


def _grad_phase(ph: _Phase, qk, kb, vb, ok, dok, lk, gk, scale, bm, bn):
    """``(dq, dk_buf, dv_buf)`` of one phase against the final ``ok`` / raw ``lk``."""
    H, D = qk.shape[0], qk.shape[-1]
    dq = torch.zeros_like(qk)
    dkb = torch.zeros_like(kb).view(H, -1, bn, D)
    dvb = torch.zeros_like(dkb)
    for c0, c1, w in ph.chunks:
        idx, kg, vg, bias = _gather(ph, kb, vb, c0, c1, w, bn)
        r = lambda x: x[:, c0 * bm:c1 * bm].reshape(H, c1 - c0, bm, x.shape[-1])  # noqa: E731
        g = None if gk is None else r(gk.unsqueeze(-1)).squeeze(-1)
        dqc, dkg, dvg = chunk_backward(r(dok), r(qk), kg, vg, r(ok), r(lk.unsqueeze(-1)).squeeze(-1), bias, scale, g)
        dq[:, c0 * bm:c1 * bm] = dqc.reshape(H, -1, D)
        dkb.index_add_(1, idx, dkg.reshape(H, -1, bn, D))
        dvb.index_add_(1, idx, dvg.reshape(H, -1, bn, D))
    return dq, dkb.view(H, -1, D), dvb.view(H, -1, D)


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, D]`` -> ``[n, B*H*D]`` (what the collectives move)."""
    B, H, n, D = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, B * H * D)


def _exchange(cp: ContextParallel, send: torch.Tensor, send_splits, recv_splits, key: str):
    """Start ``all_to_all_single`` of rows of ``send``; returns ``(recv, work)``."""
    recv = send.new_empty((sum(recv_splits), send.shape[1]))
    work = dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=cp.group,
                                  async_op=True)
    cp.stats[key] += send.numel() * send.element_size()
    return recv, work


class _CPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay: _Layout, scale: float, cp: ContextParallel):
        B, Hq, n, D = q.shape
        Hkv = k.shape[1]
        sh = lay.sharding
        bm, bn = sh.block_m, sh.block_n
        dev = q.device
        # K/V travel in their own dtype; the math below is fp32.
        kv_local = torch.cat([_tokens_first(k), _tokens_first(v)], dim=1)
        recv, work = _exchange(cp, kv_local.index_select(0, lay.send_index.to(dev)), lay.send_splits,
                               lay.recv_splits, "forward_bytes")
        kv_local = kv_local.float()
        T = lay.q_tiles()
        q_index = lay.q_index.to(dev)
        qpad = torch.cat([q.float(), q.new_zeros((B, Hq, 1, D), dtype=torch.float32)], dim=2)
        qk_all = qpad.index_select(2, q_index)  # [B, Hq, T*BM, D]
        own_rows = lay.own_tiles * bn

        def buffer(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # rows [m, 2*B*Hkv*D] of cat(local, received, zero) -> K, V [B, Hkv, m, D]
            x = rows.view(len(rows), 2, B, Hkv, D).permute(1, 2, 3, 0, 4)
            return x[0], x[1]

        zero = kv_local.new_zeros((1, kv_local.shape[1]))
        kv_index = lay.kv_index.to(dev)
        # Phase 1: own tiles, while the exchange runs (their rows never read the received part).
        own_src = torch.cat([kv_local, zero.expand(max(len(recv), 0) + 1, -1)], 0)
        kb_own, vb_own = buffer(own_src.index_select(0, kv_index[:own_rows]))
        results = {}
        for (b, gi), (lo, hi, phases) in lay.phases_on(dev).items():
            items = range(B) if len(lay.plans) == 1 else [b]
            lo, hi, kv_map = _heads(lo, hi, Hq, Hkv, dev)
            for bb in items:
                qk = qk_all[bb, lo:hi]
                o1, l1 = _attend_phase(phases[0], qk, kb_own[bb].index_select(0, kv_map),
                                       vb_own[bb].index_select(0, kv_map), scale, bm, bn)
                results[(bb, gi)] = (o1, l1)
        work.wait()
        full_src = torch.cat([kv_local, recv.float(), zero], 0)
        kb, vb = buffer(full_src.index_select(0, kv_index))
        out_k = torch.zeros((B, Hq, T * bm, D), dtype=torch.float32, device=dev)
        lse_k = torch.full((B, Hq, T * bm), float("-inf"), dtype=torch.float32, device=dev)
        for (b, gi), (lo, hi, phases) in lay.phases_on(dev).items():
            items = range(B) if len(lay.plans) == 1 else [b]
            lo, hi, kv_map = _heads(lo, hi, Hq, Hkv, dev)
            for bb in items:
                qk = qk_all[bb, lo:hi]
                o1, l1 = results[(bb, gi)]
                o2, l2 = _attend_phase(phases[1], qk, kb[bb].index_select(0, kv_map),
                                       vb[bb].index_select(0, kv_map), scale, bm, bn)
                l1 = l1.masked_fill(~phases[0].row_any, float("-inf"))
                l2 = l2.masked_fill(~phases[1].row_any, float("-inf"))
                lse = torch.logaddexp(l1, l2)
                safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
                w1 = torch.exp(l1 - safe).unsqueeze(-1)
                w2 = torch.exp(l2 - safe).unsqueeze(-1)
                out_k[bb, lo:hi] = o1 * w1 + o2 * w2
                lse_k[bb, lo:hi] = lse
        q_rows = lay.q_rows.to(dev)
        out = out_k.index_select(2, q_rows)
        lse = lse_k.index_select(2, q_rows)
        ctx.lay, ctx.scale, ctx.cp = lay, scale, cp
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out_k, lse_k, kb, vb)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_k, lse_k, kb, vb = ctx.saved_tensors
        lay: _Layout = ctx.lay
        cp: ContextParallel = ctx.cp
        sh = lay.sharding
        bm, bn = sh.block_m, sh.block_n
        B, Hq, n, D = q.shape
        Hkv = k.shape[1]
        dev = q.device
        q_rows = lay.q_rows.to(dev)
        dok = torch.zeros_like(out_k)
        if dout is not None:
            dok.index_copy_(2, q_rows, dout.float())
        gk = None
        if dlse is not None:
            gk = torch.zeros_like(lse_k).index_copy_(2, q_rows, dlse.float())
            gk = torch.where(torch.isinf(lse_k), torch.zeros_like(gk), gk)
        raw = torch.where(torch.isinf(lse_k), torch.zeros_like(lse_k), lse_k)
        q_index = lay.q_index.to(dev)
        qpad = torch.cat([q.float(), q.new_zeros((B, Hq, 1, D), dtype=torch.float32)], dim=2)
        qk_all = qpad.index_select(2, q_index)
        dq_k = torch.zeros_like(qk_all)
        dkb = torch.zeros_like(kb)  # [B, Hkv, S*BN, D]
        dvb = torch.zeros_like(vb)
        own_rows = lay.own_tiles * bn
        # Remote tiles first: their dK/dV go back to the owners while the own tiles are done.
        for phase in (1, 0):
            for (b, gi), (lo, hi, phases) in lay.phases_on(dev).items():
                items = range(B) if len(lay.plans) == 1 else [b]
                lo, hi, kv_map = _heads(lo, hi, Hq, Hkv, dev)
                for bb in items:
                    dq, dkq, dvq = _grad_phase(phases[phase], qk_all[bb, lo:hi], kb[bb].index_select(0, kv_map),
                                               vb[bb].index_select(0, kv_map), out_k[bb, lo:hi], dok[bb, lo:hi],
                                               raw[bb, lo:hi], None if gk is None else gk[bb, lo:hi],
                                               ctx.scale, bm, bn)
                    dq_k[bb, lo:hi] += dq
                    dkb[bb].index_add_(0, kv_map, dkq)
                    dvb[bb].index_add_(0, kv_map, dvq)
            if phase == 1:
                far = torch.cat([_tokens_first(dkb[:, :, own_rows:]), _tokens_first(dvb[:, :, own_rows:])], 1)
                # Buffer rows -> received token rows (padding rows carry nothing and are dropped).
                src = lay.kv_index[own_rows:].to(dev) - lay.local_n
                valid = src < sum(lay.recv_splits)
                back = far.new_zeros((sum(lay.recv_splits), far.shape[1]))
                back.index_copy_(0, src[valid], far[valid])
                got, work = _exchange(cp, back, lay.recv_splits, lay.send_splits, "backward_bytes")
        dq = dq_k.index_select(2, q_rows)
        # Own tiles: buffer rows -> local tokens (each local token appears once among them).
        own_src = lay.kv_index[:own_rows].to(dev)
        keep = own_src < lay.local_n
        dkv = torch.zeros((lay.local_n, 2 * B * Hkv * D), dtype=torch.float32, device=dev)
        own = torch.cat([_tokens_first(dkb[:, :, :own_rows]), _tokens_first(dvb[:, :, :own_rows])], 1)
        dkv.index_add_(0, own_src[keep], own[keep])
        work.wait()
        # Partials from the other ranks, in source-rank order (send_index is laid out that way).
        dkv.index_add_(0, lay.send_index.to(dev), got)
        dkv = dkv.view(lay.local_n, 2, B, Hkv, D).permute(1, 2, 3, 0, 4)
        qd, kd, vd = ctx.dtypes
        return dq.to(qd), dkv[0].to(kd), dkv[1].to(vd), None, None, None


# --------------------------------------------------------------------------------------------
# shard / unshard
# --------------------------------------------------------------------------------------------

def _all_parts(cp: ContextParallel, lay: _Layout, local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``[n_r, E]`` rows assembled to ``[N, E]`` in token order (an all_gather)."""
    sizes = [len(t) for t in lay.tokens]
    top = max(sizes)
    pad = local.new_zeros((top, local.shape[1]))
    pad[:len(local)] = local
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad.contiguous(), group=cp.group)
    full = local.new_empty((lay.pattern.n, local.shape[1]))
    for t, part, size in zip(lay.tokens, parts, sizes):
        full[torch.from_numpy(t).to(local.device)] = part[:size]
    return full


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay: _Layout, cp: ContextParallel):
        if x.shape[2] != lay.pattern.n:
            raise AttnError(f"shard() takes the full sequence: N = {lay.pattern.n}, got {x.shape[2]} tokens")
        ctx.lay, ctx.cp, ctx.shape = lay, cp, x.shape
        return x.index_select(2, torch.from_numpy(lay.tokens[lay.rank]).to(x.device))

    @staticmethod
    def backward(ctx, g):
        B, H, N, D = ctx.shape
        full = _all_parts(ctx.cp, ctx.lay, _tokens_first(g.contiguous()))
        return full.view(N, B, H, D).permute(1, 2, 0, 3).contiguous(), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, lay: _Layout, cp: ContextParallel):
        B, H, n, D = y.shape
        ctx.lay = lay
        full = _all_parts(cp, lay, _tokens_first(y.contiguous()))
        return full.view(lay.pattern.n, B, H, D).permute(1, 2, 0, 3).contiguous()

    @staticmethod
    def backward(ctx, g):
        lay = ctx.lay
        return g.index_select(2, torch.from_numpy(lay.tokens[lay.rank]).to(g.device)), None, None
