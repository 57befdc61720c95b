"""The literal semantics of ``route(...)`` selection (docs/language.md §13.1), in numpy: the oracle.

For one batch item, :func:`route_content` turns Q and K into the routing decisions that
:class:`~attnlang.pattern.Route` reads through ``Env.content``:

1. ``permute_keys = importance(segment = S)`` (PBS-Attn): importance(k) = mean over the last
   ``B`` queries of ``softmax_k(scale * Q K^T)``; keys reordered inside segments of ``S`` by
   descending importance (ties: original index), a shorter tail segment stays in place;
2. pooled means in fp32: Q over each query group, K over each key block;
3. scores ``scale * meanQ . meanK`` (fp32), per query head (K of its KV head under GQA);
4. eligibility: a block is eligible for a group when ``among`` allows some pair between them
   (static, evaluated on original indices; cached per pattern);
5. selection: ``top = k`` or ``threshold = tau`` over eligible blocks, per group
   (``scope = query``) or jointly over the head (``scope = head``); ties towards the lower
   block number (then the lower group). The threshold softmax is taken in float64 over the
   fp32 scores, so the cut does not depend on summation order.

    >>> import numpy as np
    >>> from attnlang.pattern import Layout, Route
    >>> r = Route(block=(4,), top=1, query_block=(4,))
    >>> q = np.zeros((1, 8, 2), np.float32); k = np.zeros((1, 8, 2), np.float32)
    >>> k[0, 4:, 0] = q[0, :, 0] = 1.0       # the second key block scores highest
    >>> route_content(r, Layout.of(8), q, k, 1.0)[r][0].astype(int).tolist()
    [[0, 1], [0, 1]]

The torch version in ``attnlang.runtime.routing`` computes the same decisions faster and is
tested equal to this one. Selection is not differentiated.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from attnlang.boxes import block_ids, group_ids
from attnlang.order import Ordering
from attnlang.pattern import Empty, Env, Expr, Full, Layout, Pattern, Route
from attnlang.plan import EMPTY, FULL, PARTIAL
from attnlang.passes.classify import plan_group
from attnlang.passes.tiles import Ctx

ELEMENTS = 1 << 22  # (query, key) pairs of `among` evaluated at once


# --------------------------------------------------------------------------------------------
# eligibility (static: depends on `among` and the partitions only)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def eligibility(route: Route, layout: Layout) -> np.ndarray:
    """bool [groups, blocks]: ``among`` allows some (q, k) between group and block (no permutation)."""
    G, nb = route.groups(layout), route.blocks(layout)
    if isinstance(route.among, Full):
        return np.ones((G, nb), dtype=bool)
    fast = _eligibility_planned(route, layout)
    if fast is not None:
        return fast
    return _eligibility_dense(route, layout, block_ids(route, layout)[None])[0]


def eligibility_permuted(route: Route, layout: Layout, perm: np.ndarray) -> np.ndarray:
    """bool [H, groups, blocks] when key blocks are runs of permuted positions: ``perm [H, N]``
    (position -> key). ``among`` is evaluated on original indices through the static reach of
    every group (which keys it may see at all), then OR-ed over each block's keys."""
    G, nb = route.groups(layout), route.blocks(layout)
    if isinstance(route.among, Full):
        return np.ones((len(perm), G, nb), dtype=bool)
    reach = _reach(route, layout)
    starts = np.arange(0, layout.n, route.block[0])
    return np.stack([np.logical_or.reduceat(reach[:, p], starts, axis=1) for p in np.asarray(perm)])


@functools.lru_cache(maxsize=8)
def _reach(route: Route, layout: Layout) -> np.ndarray:
    """bool [groups, N]: ``among`` allows some query of the group to see key k (1-D layouts)."""
    o = Ordering.natural(layout)
    ctx = Ctx(layout, o, o.tiles("q", route.query_block[0]), o.tiles("kv", 1), {})
    part, full, _ = plan_group(route.among, ctx)
    out = np.zeros((route.groups(layout), layout.n), dtype=bool)
    for t in (part, full):
        out[np.repeat(np.arange(t.rows), t.counts()), t.indices] = True
    return out


def _eligibility_dense(route: Route, layout: Layout, kblock: np.ndarray) -> np.ndarray:
    """Literal eligibility, O(N²) predicate evaluations in bounded chunks of whole groups.

    ``kblock [H, N]`` is the block of every key (per head when keys are permuted).
    """
    n, G, nb = layout.n, route.groups(layout), route.blocks(layout)
    gid = group_ids(route, layout)
    qorder = np.argsort(gid, kind="stable")
    starts = np.searchsorted(gid[qorder], np.arange(G + 1))
    out = np.zeros((len(kblock), G, nb), dtype=bool)
    korders = [np.argsort(kb, kind="stable") for kb in kblock]
    kstarts = [np.searchsorted(kb[o], np.arange(nb)) for kb, o in zip(kblock, korders)]
    keys = layout.points(np.arange(n)[None, :])
    env = Env(layout)
    rows = max(1, ELEMENTS // n)
    g0 = 0
    while g0 < G:
        g1 = max(g0 + 1, int(np.searchsorted(starts, starts[g0] + rows, side="right")) - 1)
        g1 = min(g1, G)
        qs = qorder[starts[g0]:starts[g1]]
        m = np.broadcast_to(route.among.allowed(layout.points(qs[:, None]), keys, env), (len(qs), n))
        per_group = np.logical_or.reduceat(m, starts[g0:g1] - starts[g0], axis=0)  # [g, N]
        for h, (o, ks) in enumerate(zip(korders, kstarts)):
            out[h, g0:g1] = np.logical_or.reduceat(per_group[:, o], ks, axis=1)
        g0 = g1
    return out


def _eligibility_planned(route: Route, layout: Layout) -> np.ndarray | None:
    """Eligibility from the planner's exact tile classes, with groups and blocks as tiles
    (1-D, or boxes that nest): work grows with the eligible pairs, not N². None otherwise."""
    cls = group_block_classes(route.among, route, layout)
    return None if cls is None else cls != EMPTY


def group_block_classes(expr: Expr, route: Route, layout: Layout) -> np.ndarray | None:
    """int8 ``[groups, blocks]``: the exact EMPTY / PARTIAL / FULL class of a static ``expr`` on
    every (query group, key block) of ``route``, from the planner's tile rules with groups and
    blocks as tiles (1-D, or boxes that nest); None when groups or blocks are not tiles."""
    G, nb = route.groups(layout), route.blocks(layout)
    if isinstance(expr, (Full, Empty)):
        return np.full((G, nb), FULL if isinstance(expr, Full) else EMPTY, dtype=np.int8)
    Bq, B = route.query_block, route.block
    if layout.rank == 1:
        o = Ordering.natural(layout)
    elif all(b % a == 0 for a, b in zip(Bq, B)) or all(a % b == 0 for a, b in zip(Bq, B)):
        o = Ordering.boxed(layout, Bq, B)
    else:
        return None
    ctx = Ctx(layout, o, o.tiles("q", math.prod(Bq)), o.tiles("kv", math.prod(B)), {})
    part, full, _ = plan_group(expr, ctx)
    gid, bid = _tile_ids(ctx, "q", group_ids(route, layout)), _tile_ids(ctx, "kv", block_ids(route, layout))
    if gid is None or bid is None:
        return None
    out = np.zeros((G, nb), dtype=np.int8)
    for t, c in ((part, PARTIAL), (full, FULL)):
        if np.array_equal(gid, np.arange(G)) and np.array_equal(bid, np.arange(nb)):
            out[t.to_dense()] = c  # tiles are the groups and blocks (no O(pairs) index lists)
        else:
            out[gid[np.repeat(np.arange(t.rows), t.counts())], bid[t.indices]] = c
    return out


def _tile_ids(ctx: Any, side: str, ids: np.ndarray) -> np.ndarray | None:
    """Group/block id of every tile of one side, or None when a tile spans two of them."""
    tile, tok = ctx.tokens(side)
    lo = np.full(ctx.side(side).count, -1, dtype=np.int64)
    hi = np.full_like(lo, -1)
    np.maximum.at(hi, tile, ids[tok])
    lo[:] = hi
    np.minimum.at(lo, tile, ids[tok])
    return None if np.any(lo != hi) else hi


# --------------------------------------------------------------------------------------------
# permutation, pooling, scores, selection
# --------------------------------------------------------------------------------------------

def importance_perm(route: Route, q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """PBS-Attn key order, int64 [Hq, N]: permuted position -> original key index."""
    Hq, n, _ = q.shape
    rep = Hq // k.shape[0]
    last = q[:, max(0, n - route.block[0]):]
    s = np.einsum("hqd,hkd->hqk", last, np.repeat(k, rep, axis=0)).astype(np.float32) * np.float32(scale)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    imp = p.mean(axis=1, dtype=np.float32)  # [Hq, N]
    S = route.permute
    whole = (n // S) * S
    perm = np.broadcast_to(np.arange(n), (Hq, n)).copy()
    seg = imp[:, :whole].reshape(Hq, -1, S)
    order = np.argsort(-seg, axis=-1, kind="stable")  # stable: equal importance keeps index order
    perm[:, :whole] = (order + np.arange(0, whole, S)[None, :, None]).reshape(Hq, whole)
    return perm


def segment_mean(x: np.ndarray, ids: np.ndarray, count: int) -> np.ndarray:
    """Mean of ``x [H, N, D]`` over tokens sharing an id (``ids [N]`` or ``[H, N]``): fp32 [H, count, D]."""
    H, n, D = x.shape
    ids = np.broadcast_to(ids, (H, n))
    out = np.zeros((H, count, D), dtype=np.float32)
    num = np.zeros((H, count), dtype=np.float32)
    for h in range(H):
        np.add.at(out[h], ids[h], x[h].astype(np.float32))
        np.add.at(num[h], ids[h], 1.0)
    return out / np.maximum(num, 1)[..., None]


def select(route: Route, scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """bool [H, groups, blocks]: the selected blocks, given fp32 ``scores`` and ``eligible``."""
    H, G, nb = scores.shape
    eligible = np.broadcast_to(eligible, scores.shape)
    if route.scope == "head":
        # Joint over the head's (group, block) pairs; flat b * G + g breaks ties by block first.
        s = scores.transpose(0, 2, 1).reshape(H, 1, nb * G)
        e = eligible.transpose(0, 2, 1).reshape(H, 1, nb * G)
        top = None if route.top is None else route.top * G
        return _select_rows(s, e, top, route.threshold).reshape(H, nb, G).transpose(0, 2, 1)
    return _select_rows(scores, eligible, route.top, route.threshold)


def threshold_cut(tau: float) -> float:
    """The cumulative softmax mass at which ``threshold = tau`` stops taking blocks: ``tau``,
    except that ``threshold = 1`` keeps every eligible block. Each eligible block has a positive
    softmax, so no proper prefix sums to 1 — but in floats a long tail of tiny probabilities can
    round the running sum to 1 early, and where that happens would depend on summation order."""
    return math.inf if tau >= 1 else float(tau)


def _select_rows(s: np.ndarray, e: np.ndarray, top: int | None, tau: float | None) -> np.ndarray:
    """Per row of ``s [..., M]``: the ``top`` best eligible entries, or the fewest best ones whose
    softmax over the eligible entries reaches ``tau``; ties towards the lower index.

    The count needs only the sorted values (ties have equal values, so their order does not
    change any cumulative sum); the selection is then every entry above the cut value plus the
    lowest-index entries equal to it — the same as a stable sort, without index sorting.
    """
    z = np.where(e, s.astype(np.float64), -np.inf)
    n_el = e.sum(-1)
    srt = -np.sort(-z, axis=-1)  # descending; ineligible entries (-inf) last
    if top is not None:
        count = np.minimum(top, n_el)
    else:
        m = srt[..., :1]
        m = np.where(np.isfinite(m), m, 0.0)
        den = np.maximum(np.exp(z - m).sum(-1, keepdims=True), np.finfo(np.float64).tiny)
        c = np.cumsum(np.exp(srt - m) / den, -1)
        count = np.minimum((c < threshold_cut(tau)).sum(-1) + 1, n_el)
    cut = np.take_along_axis(srt, np.maximum(count - 1, 0)[..., None], -1)
    above = e & (z > cut)
    tied = e & (z == cut)
    room = (count - above.sum(-1))[..., None]
    return (above | (tied & (np.cumsum(tied, -1) <= room))) & (count[..., None] > 0)


def route_content(route: Route, layout: Layout, q: np.ndarray, k: np.ndarray, scale: float) -> dict:
    """The content entries of one bound Route for one batch item: ``q [Hq, N, D]``, ``k [Hkv, N, D]``.

    Returns ``{route: bool [Hq, groups, blocks]}``, plus ``(route, "perm")`` / ``(route, "pos")``
    (int64 [Hq, N]) with ``permute_keys``.
    """
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    Hq = q.shape[0]
    kv_of = np.arange(Hq) // (Hq // k.shape[0])
    G, nb = route.groups(layout), route.blocks(layout)
    qmean = segment_mean(q, group_ids(route, layout), G)
    out: dict[Any, np.ndarray] = {}
    if route.permute is None:
        kmean = segment_mean(k, block_ids(route, layout), nb)[kv_of]
        elig = eligibility(route, layout)[None]
    else:
        perm = importance_perm(route, q, k, scale)
        pos = np.argsort(perm, axis=-1)
        kmean = segment_mean(k[kv_of], pos // route.block[0], nb)
        elig = eligibility_permuted(route, layout, perm)
        out[(route, "perm")], out[(route, "pos")] = perm, pos
    scores = np.einsum("hgd,hbd->hgb", qmean, kmean).astype(np.float32) * np.float32(scale)
    out[route] = select(route, scores, elig)
    return out


def routes(pattern: Pattern) -> list[Route]:
    """The distinct Route nodes of a pattern (every head branch)."""
    seen: dict[Route, None] = {}
    for _, _, e in pattern.exprs():
        for node in e.walk():
            if isinstance(node, Route):
                seen.setdefault(node)
    return list(seen)


def pattern_content(pattern: Pattern, q: np.ndarray, k: np.ndarray, scale: float | None = None) -> dict:
    """Every Route's content for one batch item (``q [Hq, N, D]``, ``k [Hkv, N, D]``), in numpy:
    pass it to ``pattern.mask(content=...)`` or ``make_plan(..., content=...)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out: dict[Any, np.ndarray] = {}
    for r in routes(pattern):
        out.update(route_content(r, pattern.layout, q, k, scale))
    return out


__all__ = ["route_content", "pattern_content", "routes", "select", "eligibility",
           "eligibility_permuted", "importance_perm", "segment_mean", "group_ids", "block_ids"]
