"""The torch routing stage equals the numpy oracle (selection, permutation); eligibility paths agree."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from attnlang.pattern import Pattern, block, causal, full, route, sliding
from attnlang.routing import _eligibility_dense, block_ids, eligibility, pattern_content, routes
from attnlang.runtime.routing import pattern_content as torch_content
from test_route import planted, routed


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
