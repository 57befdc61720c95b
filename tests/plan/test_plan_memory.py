"""Planning memory: band-shaped rows are stored as ranges (O(query tiles)), exactly; sizes the
planner cannot hold are an AttnError before any big allocation (issue 11, item 8)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang import AttnError, Pattern, block, causal, sliding, strided, valid, window
from attnlang.pattern import INF, And, Block, Causal, Halo, Keys, Neighborhood, Not, Queries, Range, Window
from attnlang.plan import BlockTable, Plan, render_cells, render_tile_map, cell_factors
from attnlang.planner import make_plan


def _range_backed(plan: Plan) -> bool:
    return all(t.ranges is not None and not t.materialised for g in plan.groups for t in (g.partial, g.full))


def test_causal_million_plan_stores_ranges_not_tiles():
    plan = make_plan(Pattern.create(causal, tokens=1 << 20))
    g = plan.groups[0]
    assert plan.stats()["visited"] == 16384 * 16385 // 2
    assert _range_backed(plan)
    stored = sum(a.nbytes for t in (g.partial, g.full) for a in (*t.ranges, t.indptr))
    assert stored <= 64 * plan.q_tiles + 16  # bytes per query tile, not per visited tile (134M of them)
    # Transposes (backward tables), the printed plan and the simulator's rows stay ranges too.
    assert g.partial_t.ranges is not None and g.full_t.ranges is not None
    assert str(plan).count("\n") < 100
    from attnlang.rows import row_layout

    lay = row_layout(g.full, g.partial)
    assert lay.width == plan.kv_tiles
    assert not g.full.materialised and not g.full_t.materialised


def test_causal_four_million_plans():
    n, r = 1 << 22, 4096
    plan = make_plan(Pattern.create(causal & sliding(r), tokens=n))
    assert _range_backed(plan)
    assert plan.allowed_pairs[0] == r * (r + 1) // 2 + (n - r) * (r + 1)


def test_difference_of_intervals_is_ranges():
    """MoBA's eligibility ``causal - block(size)``: one key interval per query."""
    p = Pattern.create(And((Causal(), Not(Block((512,), (0,))))), tokens=1 << 16)
    plan = make_plan(p, block_m=16, block_n=64)
    assert _range_backed(plan)


def test_impossible_size_is_an_attn_error():
    with pytest.raises(AttnError, match="tile pairs .* too large"):
        make_plan(Pattern.create(strided(3), tokens=1 << 20))  # 268M visited tiles
    with pytest.raises(AttnError, match="too large to plan"):
        make_plan(Pattern.create(causal, tokens=1 << 33))


def _interval_exprs(n: int):
    """Conjunctions (and differences) of primitives whose rows are key intervals."""
    b = st.integers(0, n)
    leaf = st.one_of(
        st.just(Causal()),
        st.builds(Window, st.one_of(b, st.just(INF)), st.one_of(b, st.just(INF))),
        st.builds(lambda s, o: Block((s,), (o,)), st.integers(1, n), st.integers(0, n)),
        st.builds(lambda s, h: Halo((s,), (h,)), st.integers(1, n), st.integers(0, n // 2)),
        st.builds(lambda k, s: Neighborhood((k,), (1,), (min(s, k),), (False,)), st.integers(1, n), st.integers(1, 8)),
        st.integers(0, n).flatmap(lambda lo: st.integers(lo, n).map(lambda hi: Keys(Range(lo, hi)))),
        st.integers(0, n).flatmap(lambda lo: st.integers(lo, n).map(lambda hi: Queries(Range(lo, hi)))),
    )
    term = st.one_of(leaf, leaf.map(Not))
    return st.lists(term, min_size=1, max_size=3).map(lambda xs: xs[0] if len(xs) == 1 else And(tuple(xs)))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), _interval_exprs(n))),
       st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]), st.data())
def test_range_rows_cover_the_mask_exactly(n_expr, bm, bn, data):
    n, expr = n_expr
    try:
        p = Pattern.create(expr, tokens=n)
    except AttnError:
        return
    plan = make_plan(p, block_m=bm, block_n=bn)
    ref = Plan.from_mask(p, p.mask(), bm, bn)
    g, r = plan.groups[0], ref.groups[0]
    for mine, theirs in ((g.partial, r.partial), (g.full, r.full), (g.partial_t, r.partial_t), (g.full_t, r.full_t)):
        assert np.array_equal(mine.counts(), theirs.counts()), p.to_attn()
        assert np.array_equal(mine.first(), theirs.first()) and np.array_equal(mine.last(), theirs.last())
        assert np.array_equal(mine.to_dense(), theirs.to_dense())
        assert np.array_equal(mine.indices, theirs.indices), p.to_attn()
    assert plan.allowed_pairs in (None, ref.allowed_pairs)
    rows, cols = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 70))
    fr, fc = cell_factors(plan.q_tiles, plan.kv_tiles, rows, cols)
    want = ref.tile_map()
    pr, pc = -(-want.shape[0] // fr) * fr, -(-want.shape[1] // fc) * fc
    mm = np.zeros((pr, pc), dtype=np.int8)
    mm[:want.shape[0], :want.shape[1]] = want
    assert np.array_equal(plan.tile_cells(0, rows, cols), mm.reshape(pr // fr, fr, pc // fc, fc).max(axis=(1, 3)))


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 3), st.data())
def test_range_table_matches_its_explicit_form(rows, cols, R, data):
    """Any sorted disjoint ranges: counts, rows, transposes and dense views equal the CSR's."""
    lo, hi = np.zeros((rows, R), dtype=np.int64), np.zeros((rows, R), dtype=np.int64)
    for i in range(rows):
        cuts = sorted(data.draw(st.lists(st.integers(0, cols), min_size=2 * R, max_size=2 * R)))
        lo[i], hi[i] = cuts[0::2], cuts[1::2]
    t = BlockTable.from_ranges(lo, hi, cols)
    e = BlockTable.from_dense(t.to_dense())
    assert np.array_equal(t.indptr, e.indptr)
    for i in range(rows):
        assert np.array_equal(t.row(i), e.row(i))
    tt, et = t.transpose(), e.transpose()
    assert np.array_equal(tt.indptr, et.indptr) and np.array_equal(tt.indices, et.indices)
    assert np.array_equal(t.indices, e.indices)


def test_tile_cells_render_like_the_dense_map():
    plan = make_plan(Pattern.create(causal & sliding(300) | block(64), tokens=100 * 64 + 13))
    fr, fc = cell_factors(plan.q_tiles, plan.kv_tiles, 64, 64)
    assert render_cells(plan.tile_cells(0, 64, 64), fr, fc) == render_tile_map(plan.tile_map())


def test_valid_rows_are_ranges():
    p = Pattern.create(causal & valid("len"), tokens=1000, inputs={"len": "length"})
    plan = make_plan(p, inputs={"len": np.int64(700)})
    assert _range_backed(plan)


# --- unions of neighborhoods and STA (issue 11, item 9) ---------------------------------------

def test_union_of_neighborhoods_is_decided_by_rules():
    """A radial-style union of neighborhoods of different sizes and dilations: no tile pair is
    left to the per-element check, and the tables equal the oracle's."""
    from attnlang import neighborhood

    p = Pattern.create(neighborhood(window=(3, 9, 9)) | neighborhood(window=(5, 5, 5), dilation=(1, 2, 2))
                       | (neighborhood(window=(7, 3, 3), dilation=(1, 3, 3)) - neighborhood(window=(3, 3, 3))),
                       tokens=(8, 24, 24))
    plan = make_plan(p)
    assert not any("per element" in note for note in plan.notes), plan.notes
    ref = Plan.from_mask(p, p.mask(), plan.block_m, plan.block_n, plan.order)
    for mine, theirs in ((plan.groups[0].partial, ref.groups[0].partial), (plan.groups[0].full, ref.groups[0].full)):
        assert np.array_equal(mine.indptr, theirs.indptr) and np.array_equal(mine.indices, theirs.indices)


@pytest.mark.parametrize("tokens,window,stride", [((16, 32, 32), (6, 12, 12), (2, 4, 4)),
                                                  ((14, 32, 32), (6, 24, 24), (2, 8, 8))])
def test_sta_reaches_its_flop_bound(tokens, window, stride):
    """Sliding tile attention (window a multiple of the stride): tile bound == FLOP bound."""
    from attnlang import neighborhood

    plan = make_plan(Pattern.create(neighborhood(window=window, stride=stride), tokens=tokens))
    s = plan.stats()
    assert s["partial"] == 0 and s["tile_bound"] == s["flop_bound"], (plan.notes, s)
