"""The planner against the dense oracle: identical tile tables, in the plan's own order."""
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang import AttnError, Pattern, block, causal, full, neighborhood, same, sliding, valid, window
from attnlang.plan import Plan
from attnlang.planner import make_plan
from strategies import patterns


def assert_matches_oracle(p, inputs=None, **kw):
    plan = make_plan(p, inputs=inputs, **kw)
    ref = Plan.from_mask(p, p.mask(inputs=inputs), plan.block_m, plan.block_n, plan.order)
    for g, r in zip(plan.groups, ref.groups):
        for mine, theirs in ((g.partial, r.partial), (g.full, r.full)):
            assert np.array_equal(mine.indptr, theirs.indptr), p.to_attn()
            assert np.array_equal(mine.indices, theirs.indices), p.to_attn()
    if plan.allowed_pairs is not None:
        assert plan.allowed_pairs == ref.allowed_pairs
    return plan


@given(patterns(), st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]),
       st.sampled_from(["natural", "tiled", "morton", "hilbert", "rcm", None]))
def test_plan_equals_oracle(p, bm, bn, order):
    assert_matches_oracle(p, block_m=bm, block_n=bn, order=order)


@settings(max_examples=25)
@given(patterns(max_rank=1, max_n=300), st.sampled_from([16, 32, 64]))
def test_default_choice_equals_oracle(p, bm):
    assert_matches_oracle(p, block_m=bm)


@given(st.integers(8, 200), st.lists(st.integers(1, 40), min_size=1, max_size=6), st.data())
def test_runtime_inputs(n, docs, data):
    ids = np.repeat(np.arange(len(docs)), docs)[:n]
    ids = np.concatenate([ids, np.full(n - len(ids), len(docs))])
    length = data.draw(st.integers(0, n))
    p = Pattern.create(causal & same("doc") & valid("len") | window(2, 0), tokens=n,
                       inputs={"doc": "ids", "len": "length"})
    assert_matches_oracle(p, inputs={"doc": ids, "len": np.int64(length)},
                          block_m=data.draw(st.sampled_from([16, 32])))
    # unsorted ids: still exact
    rng = np.random.default_rng(n)
    assert_matches_oracle(p, inputs={"doc": rng.integers(0, 3, n), "len": np.int64(length)}, block_m=16)


def test_missing_and_bad_inputs_are_errors():
    p = Pattern.create(same("doc"), tokens=64, inputs={"doc": "ids"})
    with pytest.raises(AttnError, match="doc"):
        make_plan(p)
    with pytest.raises(AttnError, match="shape"):
        make_plan(p, inputs={"doc": np.zeros(10, dtype=np.int64)})


def test_by_head_groups():
    p = Pattern.create({(0, 2): causal & sliding(8), (2, 4): causal}, tokens=100, heads=4)
    plan = assert_matches_oracle(p, block_m=16, block_n=16)
    assert [(g.lo, g.hi) for g in plan.groups] == [(0, 2), (2, 4)]
    assert make_plan(Pattern.create(causal, tokens=64)).groups[0].hi is None


@pytest.mark.parametrize("tokens,window", [((32, 32), (8, 8)), ((4, 16, 16), (2, 8, 8)),
                                           ((16, 64), (4, 16))])
def test_block_sparse_neighborhood_reaches_flop_bound(tokens, window):
    p = Pattern.create(neighborhood(window=window, stride=window), tokens=tokens)
    plan = make_plan(p)
    s = plan.stats()
    assert s["partial"] == 0 and s["tile_bound"] == s["flop_bound"]
    assert plan.tile_q == window


def test_dilated_neighborhood_groups_contiguous():
    p = Pattern.create(neighborhood(window=(4, 4), stride=(4, 4), dilation=(2, 2)), tokens=(32, 32))
    plan = assert_matches_oracle(p, block_m=16, block_n=16)
    s = plan.stats()
    assert s["partial"] == 0 and s["tile_bound"] == s["flop_bound"]


@pytest.mark.parametrize("n", [130, 256, 1000, 4096, 5000])
@pytest.mark.parametrize("expr", [causal, causal & sliding(100), sliding(37), window(5, 70),
                                  block(128), causal & block(96), block(64, shift=32) & sliding(20), full])
@pytest.mark.parametrize("bm,bn", [(64, 64), (32, 64), (128, 16)])
def test_tile_range_equals_tables(n, expr, bm, bn):
    plan = make_plan(Pattern.create(expr, tokens=n), block_m=bm, block_n=bn)
    g = plan.groups[0]
    assert g.analytic is not None, expr
    qt = sp.Symbol("qt", integer=True, nonnegative=True)
    a = g.analytic
    fs = [sp.lambdify(qt, e, "numpy") for e in (a.lo, a.hi, a.full_lo, a.full_hi)]
    for i in range(plan.q_tiles):
        lo, hi, flo, fhi = (int(f(i)) for f in fs)
        assert sorted(list(g.partial.row(i)) + list(g.full.row(i))) == list(range(lo, hi))
        assert list(g.full.row(i)) == list(range(flo, max(flo, fhi)))


def test_million_token_window_is_o_visited():
    n = 1 << 20
    plan = make_plan(Pattern.create(causal & sliding(256), tokens=n))
    s = plan.stats()
    assert s["visited"] <= 6 * plan.q_tiles
    g = plan.groups[0]
    assert g.partial.indices.nbytes + g.full.indices.nbytes < 8 * 6 * plan.q_tiles
    assert s["allowed_pairs"] == sum(min(q, 256) + 1 for q in range(n))


def test_schedule_overrides_and_errors():
    p = Pattern.create(neighborhood(window=(3, 3)), tokens=(16, 16), tile_q=(4, 8), tile_kv=(4, 8))
    plan = make_plan(p)
    assert plan.tile_q == (4, 8) and plan.block_m == 32
    assert make_plan(p, order="natural").order is None
    with pytest.raises(AttnError, match="box"):
        make_plan(Pattern.create(full, tokens=(16, 16), tile_q=(3, 8)))
    with pytest.raises(AttnError, match="nest"):
        make_plan(Pattern.create(full, tokens=(16, 16), tile_q=(2, 8), tile_kv=(8, 2)))
    with pytest.raises(AttnError, match="tile size"):
        make_plan(Pattern.create(full, tokens=64), block_m=48)
