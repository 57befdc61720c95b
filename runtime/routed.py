"""Fast torch execution of ``route(...)`` patterns: a static part plus routed key blocks.

A pattern ``E`` with one route term ``R`` that appears only positively (no ``~``/``-`` over it)
splits exactly by Shannon expansion into two disjoint key sets per query:

* ``base = E[R := none]`` — the *static* part (tiled once per pattern and cached);
* ``extra = E[R := full] & ~base`` — the static constraint inside *selected* blocks.

``E = base | (R & extra)``: a query sees ``base``, plus, in every key block its group selected,
the keys ``extra`` allows there. MoBA: ``base = causal & block(S)``, ``extra = causal - block(S)``
(full on every selectable block). BiFormer: ``base = none``, ``extra = full``.

Work is dispatched by (query group, key block) pairs: the pairs ``base`` allows (static) and
the selected pairs ``extra`` allows become rows of query tokens against that block's keys
(gathered: permuted keys for PBS-Attn, boxes for 2-D/3-D blocks), bucketed by (head, block)
into tiles so one fused attention call runs many tiles at once. Routed query groups of at least
``GROUP_ROWS`` tokens instead run one tile per (head, group) against the concatenation of its
selected blocks. The class of ``base``/``extra`` on every (group, block) pair is tabulated
exactly once per pattern by the planner's tile rules; only pairs where it is partial (or keys
are padding) get a mask. Work follows the selected pairs, not the tiles they touch. The
pieces' ``(out, lse)`` are merged by log-sum-exp chunk by chunk, which is exact: the key sets are
disjoint. The backward recomputes every piece against the merged output (exact for disjoint
key sets), so gradients reach Q, K, V; the selection itself is not differentiated.

>>> import torch, attnlang
>>> fn = attnlang.compile("pattern p { tokens n[256]\\n attend moba(size = 32, top = 3) }", "p", backend="torch")
>>> fn(*(torch.randn(1, 2, 256, 16) for _ in range(3))).shape
torch.Size([1, 2, 256, 16])

Patterns outside this form (several routes, a negated route, runtime inputs, per-head
patterns, key blocks under ``MIN_BLOCK`` tokens, ``extra`` whose class the planner cannot
tabulate) run on the generic per-call plan.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attnlang.pattern import And, Empty, Env, Expr, Full, Layout, Not, Or, Pattern, Route, Same, Valid, and_, \
    not_, or_
from attnlang.plan import EMPTY, FULL, PARTIAL
from attnlang.boxes import block_ids, group_ids
from attnlang.routing import group_block_classes, routes
from attnlang.runtime.call import Call
from attnlang.runtime.tilesets import GroupTiles, Tiles, TileSetAttention

BLOCK_M = None  # query rows per tile (None: chosen per call from the selection)
MIN_BLOCK = 4  # smaller key blocks take the generic plan: a row per (query, key or two) is all overhead
GROUP_ROWS = 16  # query groups of at least this many tokens run as tiles of their own (PBS, BiFormer)
USE_FAST = True  # tests switch this off to compare with the generic per-call plan


@dataclass(frozen=True)
class Split:
    """``pattern = base | (route & extra)`` with static ``base`` / ``extra`` (module docstring)."""

    route: Route
    base: Expr  # static part (``none`` when everything is routed)
    extra: Expr  # static constraint inside selected blocks
    classes: np.ndarray = field(repr=False)  # int8 [groups, blocks]: ``extra`` on (group, block)
    natural: np.ndarray = field(repr=False)  # int8 [groups, blocks]: ``extra``, natural (unpermuted) blocks
    base_classes: np.ndarray = field(repr=False)  # int8 [groups, blocks]: ``base``, natural blocks
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # base tiles per tile size


# --------------------------------------------------------------------------------------------
# The split (static: once per pattern)
# --------------------------------------------------------------------------------------------

def _subst(e: Expr, r: Route, value: Expr) -> Expr:
    """``e`` with route ``r`` replaced by ``value``, re-canonicalised."""
    if e is r:
        return value
    if isinstance(e, And):
        return and_(*(_subst(i, r, value) for i in e.items))
    if isinstance(e, Or):
        return or_(*(_subst(i, r, value) for i in e.items))
    if isinstance(e, Not):
        return not_(_subst(e.item, r, value))
    return e


def _polarities(e: Expr, r: Route, positive: bool = True) -> set[bool]:
    if e is r:
        return {positive}
    if isinstance(e, Not):
        return _polarities(e.item, r, not positive)
    out: set[bool] = set()
    for c in e.children():
        out |= _polarities(c, r, positive)
    return out


@functools.lru_cache(maxsize=32)
def split(pattern: Pattern) -> Split | None:
    """The split of a routed pattern, or None when it has another form (generic path)."""
    if not isinstance(pattern.attend, Expr) or pattern.inputs:
        return None
    rs = routes(pattern)
    if len(rs) != 1 or _polarities(pattern.attend, rs[0]) != {True}:
        return None
    r = rs[0]
    if math.prod(r.block) < MIN_BLOCK:
        return None
    base = _subst(pattern.attend, r, Empty())
    extra = and_(_subst(pattern.attend, r, Full()), not_(base))
    if any(isinstance(n, (Route, Same, Valid)) for e in (base, extra) for n in e.walk()):
        return None
    cls, base_cls = group_block_classes(extra, r, pattern.layout), group_block_classes(base, r, pattern.layout)
    if cls is None or base_cls is None:
        return None
    natural = cls
    if r.permute is not None:
        cls = _permuted_classes(cls, r, pattern.n)
    return Split(r, base, extra, cls, natural, base_cls)


def _permuted_classes(cls: np.ndarray, r: Route, n: int) -> np.ndarray:
    """Classes on permuted blocks: a permuted block holds keys of the segments its positions
    fall in (the tail stays in place), so it is FULL / EMPTY where every natural block of that
    key range is, PARTIAL otherwise (then masked per element)."""
    B, S = r.block[0], r.permute
    whole = (n // S) * S
    lo = np.arange(cls.shape[1]) * B
    hi = np.minimum(lo + B, n) - 1
    klo = np.where(lo < whole, lo // S * S, lo) // B
    khi = np.where(hi < whole, hi // S * S + S - 1, hi) // B
    count = (khi - klo + 1)[None]
    cum = lambda m: np.concatenate([np.zeros((len(cls), 1), np.int64), np.cumsum(m, 1)], 1)  # noqa: E731
    nf, ne = cum(cls == FULL), cum(cls == EMPTY)
    full = nf[:, khi + 1] - nf[:, klo] == count
    empty = ne[:, khi + 1] - ne[:, klo] == count
    return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Tiles: (query group, key block) pairs as rows against the block's keys
# --------------------------------------------------------------------------------------------

@dataclass
class _Local:
    """Tiles before placing them in a call: head-relative tokens (see :func:`_tile_pairs`)."""

    block_m: int
    head: np.ndarray  # int64 [T]
    q_tok: np.ndarray  # int64 [T * BM]: query token, -1 padding
    k_tok: np.ndarray  # int64 [T, BK]: key token, -1 padding
    allow: np.ndarray  # bool [M, BM, BK]
    mask_id: np.ndarray  # int64 [T]


def _tokens_by(ids: np.ndarray, count: int) -> np.ndarray:
    """``[count, max size]`` token lists of each id, padded with -1."""
    order = np.argsort(ids, kind="stable")
    size = np.bincount(ids, minlength=count)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    out = np.full((count, max(int(size.max()), 1)), -1, dtype=np.int64)
    out[ids[order], np.arange(len(ids)) - np.repeat(start, size)] = order
    return out


def _tile_rows(rows: int, buckets: int) -> int:
    """Query rows per tile: big tiles share one gathered key block among more queries, but a
    (head, block) bucket's last tile is padded; a power of two near half the mean bucket
    (``rows`` over ``buckets`` non-empty ones), 16..256."""
    mean = rows / max(buckets, 1)
    return int(min(256, max(16, 2 ** math.floor(math.log2(max(mean / 2, 1))))))


def _tile_pairs(h, g, blk, part, gtok: np.ndarray, keys, expr: Expr, natural: np.ndarray, kblock: np.ndarray,
                layout: Layout, bm: int) -> _Local:
    """Selected (head, group, block) pairs -> tiles of query rows against one key block each.

    Rows are bucketed by (head, block), full pairs before partial ones, and cut into tiles of
    ``BM`` rows; ``keys(head [T], block [T])`` gives each tile's key tokens ``[T, BK]`` (-1
    padding). Tiles with partial rows or padding keys get a mask: on partial rows, ``expr`` by
    the class ``natural [group, natural block of the key]`` (``kblock``: each key's block),
    evaluated per element only where that class is PARTIAL. Unmasked tiles come first, so most
    chunks run without a bias.
    """
    nb = int(blk.max()) + 1 if len(blk) else 1
    key = h * nb
    key += blk
    if part.any() or (key[1:] < key[:-1]).any():  # routed pairs usually come in this order already
        o = np.lexsort((part, blk, h))
        h, g, blk, part, key = h[o], g[o], blk[o], part[o], key[o]
    tok = gtok[g]
    ok = tok >= 0
    if ok.all() and tok.shape[1] == 1:  # one token per group (MoBA, VMoBA): rows are the pairs
        rh, rblk, rpart, rg, rtok, bucket = h, blk, part, g, tok[:, 0], key
    else:
        rh, rblk, rpart, rg = (np.broadcast_to(x[:, None], tok.shape)[ok] for x in (h, blk, part, g))
        rtok = tok[ok]
        bucket = rh * nb + rblk
    starts = np.nonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))[0] if len(bucket) else np.zeros(0, int)
    size = np.diff(np.concatenate([starts, [len(bucket)]]))
    ntiles = -(-size // bm)
    T = int(ntiles.sum())
    # Row i of bucket j goes to padded position i + (first padded row of j) - (first row of j):
    # a running sum of steps of 1 that jump by the padding at bucket starts (one array of rows,
    # which matters at millions of per-token rows).
    pos = np.ones(len(bucket), dtype=np.int64)
    if len(bucket):
        pos[0] = 0
        pos[starts[1:]] += np.diff((np.cumsum(ntiles) - ntiles) * bm - starts)
        np.cumsum(pos, out=pos)
    th, tb = np.repeat(rh[starts], ntiles), np.repeat(rblk[starts], ntiles)
    kt = keys(th, tb)
    q_tok = np.full((T, bm), -1, dtype=np.int64)
    q_tok.reshape(-1)[pos] = rtok
    rowpart = np.zeros((T, bm), dtype=bool)
    q_grp = np.zeros((T, bm), dtype=np.int64)
    if rpart.any():
        rowpart.reshape(-1)[pos] = rpart
        q_grp.reshape(-1)[pos] = rg
    need = rowpart.any(1) | (kt < 0).any(1)
    if need.any():  # unmasked tiles first, then masked ones
        order = np.argsort(need, kind="stable")
        th, kt, q_tok, rowpart, need, q_grp = (x[order] for x in (th, kt, q_tok, rowpart, need, q_grp))
    masked = np.nonzero(need)[0]
    allow = np.broadcast_to((kt[masked] >= 0)[:, None, :], (len(masked), bm, kt.shape[1])).copy()
    # Partial rows: the (group, natural key block) class decides most keys; `expr` runs on the
    # rest, element by element.
    # Classes are per (group, block), so they are looked up once per (tile, group) present.
    env = Env(layout)
    mi, row = np.nonzero(rowpart[masked])
    G = natural.shape[0]
    pair, inv = np.unique(mi * G + q_grp[masked[mi], row], return_inverse=True)
    pm, pg = np.divmod(pair, G)
    c = natural[pg[:, None], kblock[np.maximum(kt[masked[pm]], 0)]]  # [pairs, BK]
    ok = (c == FULL)[inv]
    ii, jj = np.nonzero((c == PARTIAL)[inv])
    if len(ii):
        k_ = np.maximum(kt[masked[mi[ii]], jj], 0)
        ok[ii, jj] = expr.allowed(layout.points(q_tok[masked[mi[ii]], row[ii]]), layout.points(k_), env)
    allow[mi, row] &= ok
    mask_id = np.full(T, -1, dtype=np.int64)
    mask_id[masked] = np.arange(len(masked))
    return _Local(bm, th, q_tok.reshape(-1), kt, allow, mask_id)


def _place(locs: list[tuple[_Local, int]], call: Call) -> Tiles:
    """Put head-relative tiles of batch items into the call's flat rows (one tile size)."""
    Hq, Hkv, N, B = call.heads, call.kv_heads, call.pattern.n, call.batch
    dev = call.q.device
    q_rows, k_rows, mask_id, allows = [], [], [], []
    t0 = m0 = 0
    for loc, b in locs:
        qr = loc.q_tok.reshape(len(loc.head), -1) + ((b * Hq + loc.head) * N)[:, None]
        qr[loc.q_tok.reshape(qr.shape) < 0] = B * Hq * N
        q_rows.append(qr.reshape(-1))
        kv = loc.head // (Hq // Hkv)
        k_rows.append(np.where(loc.k_tok >= 0, (b * Hkv + kv[:, None]) * N + loc.k_tok, B * Hkv * N))
        mask_id.append(np.where(loc.mask_id >= 0, loc.mask_id + m0, -1))
        allows.append(loc.allow)
        t0 += len(loc.head)
        m0 += len(loc.allow)
    allow = torch.from_numpy(np.concatenate(allows)).to(dev)
    # A masked row with nothing allowed has lse = -inf (the fused op would say 0).
    ids = np.concatenate(mask_id)
    empty = torch.zeros((len(ids), locs[0][0].block_m), dtype=torch.bool, device=dev)
    m = torch.from_numpy(ids >= 0).to(dev)
    empty[m] = ~allow.any(-1).index_select(0, torch.from_numpy(ids[ids >= 0]).to(dev))
    t = lambda xs: torch.from_numpy(np.concatenate(xs)).to(dev)  # noqa: E731
    q = t(q_rows)  # the zero query row is also the merge's sink row
    return Tiles(locs[0][0].block_m, q, t(k_rows), ids, allow, empty.reshape(-1), q)


def _group_tiles(call: Call, sp: Split, pairs: list, gtok: np.ndarray, kblock: np.ndarray) -> GroupTiles:
    """``pairs``: per batch item ``(b, h, g, blk, partial, keys)`` of kept selected pairs."""
    lay, r = call.pattern.layout, sp.route
    Hq, Hkv, N, B = call.heads, call.kv_heads, lay.n, call.batch
    bk, bm, G = math.prod(r.block), gtok.shape[1], gtok.shape[0]
    env = Env(lay)
    per = []
    t0 = 0
    for b, h, g, blk, part, keys in pairs:
        o = np.lexsort((blk, g, h))
        h, g, blk, part = h[o], g[o], blk[o], part[o]
        run = h * G + g
        starts = np.nonzero(np.concatenate([[True], run[1:] != run[:-1]]))[0]
        kc = np.diff(np.concatenate([starts, [len(run)]]))
        rank = np.arange(len(run)) - np.repeat(starts, kc)
        tile = np.repeat(np.arange(len(starts)), kc)
        pk = keys(h, blk)  # [pairs, bk] key tokens, -1 padding
        # Masked pairs (partial, or a ragged block with padding keys): the class per (group,
        # natural block of each key), `expr` where that is partial.
        pi = np.nonzero(part | (pk < 0).any(-1))[0]
        mk = pk[pi]  # [P, bk]
        c = np.where(part[pi, None], sp.natural[g[pi][:, None], kblock[np.maximum(mk, 0)]], FULL)
        c = np.where(mk >= 0, c, EMPTY)  # padding keys are never allowed
        ok = np.broadcast_to((c == FULL)[:, None, :], (len(pi), bm, bk)).copy()
        qt = gtok[g[pi]]  # [P, bm]
        ii, jj = np.nonzero(c == PARTIAL)
        if len(ii):
            qq = np.maximum(qt[ii], 0)  # [E, bm]
            ok[ii, :, jj] = np.broadcast_to(
                sp.extra.allowed(lay.points(qq), lay.points(mk[ii, jj][:, None]), env), qq.shape)
        kv = h // (Hq // Hkv)
        flat = np.where(pk >= 0, ((b * Hkv + kv) * N)[:, None] + pk, B * Hkv * N)  # flat key rows
        per.append((np.full(len(starts), b), h[starts], g[starts], kc, tile + t0, rank, flat, tile[pi] + t0,
                    rank[pi], ok))
        t0 += len(starts)
    # One ordering for all batch items: tiles by block count.
    tb, th, tg, kc, ptile, prank, flat, st, si, sa = (np.concatenate(x) for x in zip(*per))
    order = np.argsort(kc, kind="stable")
    new_of = np.empty_like(order)
    new_of[order] = np.arange(len(order))
    tb, th, tg, kc = tb[order], th[order], tg[order], kc[order]
    kr = np.full((len(kc), int(kc.max()), bk), B * Hkv * N, dtype=np.int64)
    kr[new_of[ptile], prank] = flat
    st = new_of[st]
    so = np.argsort(st, kind="stable")
    st, si, sa = st[so], si[so], sa[so]
    q_tok = gtok[tg]  # [T, bm]
    qr = np.where(q_tok >= 0, (tb[:, None] * Hq + th[:, None]) * N + q_tok, B * Hq * N)
    # A row sees nothing only if its tile has no full block and no partial block allows it.
    full_blocks = kc - np.bincount(st, minlength=len(kc))
    some = np.broadcast_to((full_blocks > 0)[:, None], q_tok.shape).copy()
    np.logical_or.at(some, st, sa.any(-1))
    dev = call.q.device
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    q = t(qr.reshape(-1))
    return GroupTiles(bm, bk, q, t(kr.reshape(len(kc), -1)), kc, B * Hkv * N, st, si, t(sa),
                      t(~some.reshape(-1)), q)


def _base_tiles(sp: Split, call: Call) -> _Local | None:
    """The static part's tiles for one head (every head and call repeats them): cached."""
    if "base" not in sp.cache:
        r, lay = sp.route, call.pattern.layout
        g, blk = np.nonzero(sp.base_classes)
        part = sp.base_classes[g, blk] == PARTIAL
        btok = _tokens_by(block_ids(r, lay), r.blocks(lay))
        gtok = _tokens_by(group_ids(r, lay), r.groups(lay))
        h = np.zeros(len(g), np.int64)
        sp.cache["base"] = None if not len(g) else _tile_pairs(
            h, g, blk, part, gtok, lambda th, tb: btok[tb], sp.base, sp.base_classes, block_ids(r, lay), lay,
            BLOCK_M or _tile_rows(int((gtok[g] >= 0).sum()), len(np.unique(blk))))
    return sp.cache["base"]


def tiles(call: Call, sp: Split) -> list[Tiles]:
    """The call's tiles: the static part (cached, repeated per head) and, per batch item, every
    selected (group, block) pair where ``extra`` allows something."""
    r, lay = sp.route, call.pattern.layout
    N, Hq = lay.n, call.heads
    gtok = _tokens_by(group_ids(r, lay), r.groups(lay))
    gsize = (gtok >= 0).sum(1)
    has_partial = bool((sp.classes == PARTIAL).any())
    kblock = block_ids(r, lay)
    btok = _tokens_by(kblock, r.blocks(lay))
    bk = math.prod(r.block)
    out = []
    base = _base_tiles(sp, call)
    key = ("tiles", call.batch, Hq, call.kv_heads, str(call.q.device))
    if base is not None and key not in sp.cache:
        # Every head repeats the one-head tiles and shares their masks; kept for later calls.
        heads = _Local(base.block_m, np.repeat(np.arange(Hq), len(base.head)), np.tile(base.q_tok, Hq),
                       np.tile(base.k_tok, (Hq, 1)), base.allow, np.tile(base.mask_id, Hq))
        tl = _place([(heads, b) for b in range(call.batch)], call)
        tl.chunk_bias = {}
        sp.cache[key] = tl
    if base is not None:
        out.append(sp.cache[key])
    routed, grouped, bm = [], [], None
    for b in range(call.batch):
        content = call.content(b)
        sel = content[r] & (sp.classes != EMPTY)[None]  # selected pairs where `extra` allows something
        if gtok.shape[1] < GROUP_ROWS:  # rows by (head, block, group): the order tiles are cut in
            h, blk, g = np.nonzero(sel.transpose(0, 2, 1))
        else:
            h, g, blk = np.nonzero(sel)
        if not len(h):
            continue
        part = sp.classes[g, blk] == PARTIAL if has_partial else np.zeros(len(h), dtype=bool)
        if r.permute is None:
            keys = lambda th, tb: btok[tb]  # noqa: E731
        else:
            perm = content[(r, "perm")]

            def keys(th, tb, perm=perm):
                pos = tb[:, None] * bk + np.arange(bk)[None]
                return np.where(pos < N, perm[th[:, None], np.minimum(pos, N - 1)], -1)
        if gtok.shape[1] >= GROUP_ROWS:
            grouped.append((b, h, g, blk, part, keys))
            continue
        # One tile size per call, from the rows and non-empty (head, block) buckets of the first item.
        bm = bm or BLOCK_M or _tile_rows(int((np.count_nonzero(sel, axis=(0, 2)) * gsize).sum()),
                                         int(np.count_nonzero(sel.any(1))))
        routed.append((_tile_pairs(h, g, blk, part, gtok, keys, sp.extra, sp.natural, kblock, lay, bm), b))
    if routed:
        out.append(_place(routed, call))
    if grouped:
        out.append(_group_tiles(call, sp, grouped, gtok, kblock))
    if not out:  # nothing allowed anywhere: an empty set keeps the outputs connected for autograd
        none = torch.zeros(0, dtype=torch.int64, device=call.q.device)
        out.append(Tiles(16, none, none.view(0, bk), np.zeros(0, np.int64),
                         torch.zeros((0, 16, bk), dtype=torch.bool, device=call.q.device),
                         torch.zeros(0, dtype=torch.bool, device=call.q.device), none))
    return out


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------

def run(call: Call, sp: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)`` of a split routed pattern."""
    B, Hq, N, _ = call.q.shape
    out, lse = TileSetAttention.apply(call.q, call.k, call.v, tiles(call, sp), call.scale)
    return out.view(B, Hq, N, call.v_dim).to(call.q.dtype), lse.view(B, Hq, N)
