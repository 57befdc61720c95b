"""Token-set joins (``random``, ``same``, ``route`` and token-set leaves): their candidate tile
pairs with exact classes, from the tokens of each tile; used by passes 3 and 4 alike.
"""
from __future__ import annotations

import numpy as np

from attnlang.errors import AttnError
from attnlang.boxes import block_ids, group_ids
from attnlang.passes.lower import Op, Term
from attnlang.passes.tiles import Ctx, input_ids, input_length
from attnlang.pattern import Range
from attnlang.pattern import Route
from attnlang.tiling import FULL, PARTIAL


def _sel_pred(sel):
    if isinstance(sel, Range):
        return lambda tok: (tok >= sel.lo) & (tok < sel.hi)
    return lambda tok: np.isin(tok, np.asarray(sel.values, dtype=np.int64))


def token_counts(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Per tile, how many of its tokens the leaf's token condition holds for (q and k sides)."""
    key = ("counts", id(t))
    if key not in ctx._cache:
        if t.op == Op.VALID:
            n = input_length(ctx.inputs, t.arg.input)
            pq = pk = lambda tok: tok < n  # noqa: E731
        elif t.op == Op.KEYS:
            pq, pk = (lambda tok: np.ones(len(tok), bool)), _sel_pred(t.arg.sel)
        else:
            pq, pk = _sel_pred(t.arg.sel), (lambda tok: np.ones(len(tok), bool))
        ctx._cache[key] = (ctx.count_tokens("q", pq), ctx.count_tokens("kv", pk))
    return ctx._cache[key]


def join_pairs(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Tile pairs sharing a (query group, key group) relation, with their exact classes.

    ``same``: groups are ids, related when equal. ``random``: groups are blocks, related when
    drawn. A pair is FULL when every (query group, key group) combination is related.
    """
    key = ("join", id(t))
    if key in ctx._cache:
        return ctx._cache[key]
    if t.op == Op.SAME:
        ids = input_ids(ctx.inputs, t.arg.input)
        _, inv = np.unique(ids, return_inverse=True)
        grp = lambda tok: inv[tok]  # noqa: E731
        n_groups = int(inv.max()) + 1 if len(inv) else 0
        rel = np.stack([np.arange(n_groups)] * 2, axis=1)
    else:
        B = t.arg.block
        grp = lambda tok: tok // B  # noqa: E731
        table = ctx._cache.setdefault(("table", id(t.arg)), t.arg.table(ctx.layout))
        rel = np.argwhere(table)
    tg = {}
    for s in ("q", "kv"):
        tile, tok = ctx.tokens(s)
        ng = max(int(rel.max()) + 1 if len(rel) else 1, 1)
        u = np.unique(tile * ng + grp(tok))
        tiles, groups = np.divmod(u, ng)
        order = np.argsort(groups, kind="stable")
        tiles, groups = tiles[order], groups[order]
        indptr = np.searchsorted(groups, np.arange(ng + 1))
        tg[s] = (tiles, indptr, np.bincount(tiles, minlength=ctx.side(s).count))
    (qtiles, qptr, qn), (ktiles, kptr, kn) = tg["q"], tg["kv"]
    a, b = rel[:, 0], rel[:, 1]
    ca, cb = qptr[a + 1] - qptr[a], kptr[b + 1] - kptr[b]
    # Expand each related (a, b) into its query tiles x key tiles.
    n1 = ca * cb
    r = np.repeat(np.arange(len(rel)), n1)
    local = np.arange(int(n1.sum()), dtype=np.int64) - np.repeat(np.cumsum(n1) - n1, n1)
    i, j = np.divmod(local, np.maximum(cb[r], 1))
    qt, kt = qtiles[qptr[a[r]] + i], ktiles[kptr[b[r]] + j]
    keys, mult = np.unique(qt * ctx.nk + kt, return_counts=True)
    q_, k_ = np.divmod(keys, ctx.nk)
    cls = np.where(mult == qn[q_] * kn[k_], FULL, PARTIAL).astype(np.int8)
    ctx._cache[key] = (keys, cls)
    return keys, cls


def route_join_pairs(t: Term, ctx: Ctx) -> tuple[np.ndarray, np.ndarray]:
    """Tile pairs of a route term with exact classes, from the head's selection table.

    Query tokens map to query groups, keys to (possibly permuted) key blocks; a tile pair is
    FULL when every (group, block) combination among its tokens is selected, PARTIAL when some
    is, and never listed when none is: O(selected pairs x tiles they touch), no N x N work.
    """
    r: Route = t.arg
    key = ("route", id(r), ctx.head)
    if key in ctx._cache:
        return ctx._cache[key]
    if r not in ctx.content:
        raise AttnError("this pattern reads Q/K content (route): plan it per call with "
                        "make_plan(pattern, content=attnlang.routing.pattern_content(pattern, q, k))")
    sel = np.asarray(ctx.content[r][ctx.head])
    qgrp = group_ids(r, ctx.layout)
    kgrp = block_ids(r, ctx.layout) if r.permute is None else \
        np.asarray(ctx.content[(r, "pos")][ctx.head]) // r.block[0]
    tg = {}
    for s, grp, ng in (("q", qgrp, sel.shape[0]), ("kv", kgrp, sel.shape[1])):
        tile, tok = ctx.tokens(s)
        u = np.unique(tile * ng + grp[tok])
        tiles, groups = np.divmod(u, ng)
        order = np.argsort(groups, kind="stable")
        tiles, groups = tiles[order], groups[order]
        tg[s] = (tiles, np.searchsorted(groups, np.arange(ng + 1)), np.bincount(tiles, minlength=ctx.side(s).count))
    (qtiles, qptr, qn), (ktiles, kptr, kn) = tg["q"], tg["kv"]
    a, b = np.nonzero(sel)
    ca, cb = qptr[a + 1] - qptr[a], kptr[b + 1] - kptr[b]
    n1 = ca * cb
    rr = np.repeat(np.arange(len(a)), n1)
    local = np.arange(int(n1.sum()), dtype=np.int64) - np.repeat(np.cumsum(n1) - n1, n1)
    i, j = np.divmod(local, np.maximum(cb[rr], 1))
    keys, mult = np.unique(qtiles[qptr[a[rr]] + i] * ctx.nk + ktiles[kptr[b[rr]] + j], return_counts=True)
    q_, k_ = np.divmod(keys, ctx.nk)
    cls = np.where(mult == qn[q_] * kn[k_], FULL, PARTIAL).astype(np.int8)
    ctx._cache[key] = (keys, cls)
    return keys, cls
