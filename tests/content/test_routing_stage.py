"""The torch routing stage equals the numpy oracle (selection, permutation); eligibility paths agree."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from attnlang.pattern import Pattern, block, causal, full, route, sliding
from attnlang.routing import _eligibility_dense, block_ids, eligibility, pattern_content, routes
from attnlang.runtime.routing import pattern_content as torch_content
from test_route_family import planted, routed


@settings(max_examples=40, deadline=None)
@given(routed())
def test_torch_selection_equals_numpy(case):
    p, (H, Hkv), seed = case
    q, k, _ = planted(seed, H, Hkv, p.n)
    a = pattern_content(p, q[0].numpy(), k[0].numpy(), 0.3)
    b = torch_content(p, q[0], k[0], 0.3)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@settings(max_examples=30, deadline=None)
@given(routed())
def test_planned_eligibility_equals_literal(case):
    p, _, _ = case
    for r in routes(p):
        if r.permute is None:
            want = _eligibility_dense(r, p.layout, block_ids(r, p.layout)[None])[0]
            assert np.array_equal(eligibility(r, p.layout), want)


def test_window_among_eligibility():
    p = Pattern.create(route(16, top=1, among=causal & sliding(20), query_block=4), tokens=100)
    r = routes(p)[0]
    assert np.array_equal(eligibility(r, p.layout), _eligibility_dense(r, p.layout, block_ids(r, p.layout)[None])[0])


def _select_rows_literal(s, e, top, tau):
    """Selection by a stable argsort (the definition), for comparison."""
    s64 = s.astype(np.float64)
    order = np.argsort(np.where(e, -s64, np.inf), axis=-1, kind="stable")
    n_el = e.sum(-1)
    if top is not None:
        count = np.minimum(top, n_el)
    else:
        z = np.where(e, s64, -np.inf)
        m = z.max(-1, keepdims=True)
        p = np.exp(z - np.where(np.isfinite(m), m, 0.0))
        p /= np.maximum(p.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
        c = np.cumsum(np.take_along_axis(p, order, -1), -1)
        count = np.minimum((c < tau).sum(-1) + 1, n_el)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(s.shape[-1]), s.shape), -1)
    return (rank < count[..., None]) & e


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 12), st.sampled_from([None, 1, 2, 5]),
       st.sampled_from([1e-6, 0.3, 0.7, 0.999, 1.0]), st.booleans())
def test_select_rows_equals_stable_argsort(seed, rows, m, top, tau, ties):
    from attnlang.routing import _select_rows
    from attnlang.runtime.routing import _select_rows as torch_select_rows

    rng = np.random.default_rng(seed)
    s = (rng.integers(0, 3, (rows, m)) if ties else rng.standard_normal((rows, m))).astype(np.float32)
    e = rng.random((rows, m)) < 0.7
    want = _select_rows_literal(s, e, top, None if top else tau)
    assert np.array_equal(_select_rows(s, e, top, None if top else tau), want)
    got = torch_select_rows(torch.from_numpy(s), torch.from_numpy(e), top, None if top else tau).numpy()
    assert np.array_equal(got, want)


def test_threshold_one_keeps_every_eligible_block_despite_a_long_tail():
    """threshold = 1: every eligible block has a positive softmax, so all are kept — even where
    the running float sum of a long tail of tiny probabilities rounds to 1 before the end."""
    n, blk = 256, 4
    q = torch.zeros(2, n, 8)
    k = torch.zeros(1, n, 8)
    q[..., 0] = 1.0
    k[0, :, 0] = -torch.arange(n, dtype=torch.float32) * 0.6  # scores fall by 2.4 per block
    for scope in ("query", "head"):
        p = Pattern.create(route(blk, threshold=1.0, among=causal, scope=scope), n)
        want = eligibility(p.attend, p.layout)
        ours = pattern_content(p, q.numpy(), k.numpy(), 1.0)[p.attend]
        theirs = torch_content(p, q, k, 1.0)[p.attend]
        assert np.array_equal(ours, np.broadcast_to(want, ours.shape)), scope
        assert np.array_equal(theirs, ours), scope
    # Just below 1 the tail is cut: the softmax mass of the first few blocks already rounds there.
    p = Pattern.create(route(blk, threshold=0.999999, among=causal), n)
    assert pattern_content(p, q.numpy(), k.numpy(), 1.0)[p.attend].sum() < want.sum() * 2
