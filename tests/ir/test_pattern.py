"""The Pattern IR's semantics: hand-computed masks per primitive and the algebra's laws."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnlang import AttnError, Pattern
from attnlang.pattern import (
    INF, Block, Causal, Empty, Full, Grid, Keys, Neighborhood, Not, Or, Range, Strided, and_,
    axial, block, causal, full, global_, grid, halo, keys, natten_window, neighborhood, none, not_,
    or_, queries, random, random_blocks, same, sink, sliding, strided, valid, window,
)
from strategies import exprs, layouts, neighborhoods, patterns


def m1(expr, n, **kw):
    """Dense mask of a 1-D pattern as an int array."""
    return Pattern.create(expr, n, **kw).mask()[0].astype(int)


def rows(mask):
    return [list(np.nonzero(r)[0]) for r in mask]


# --- table tests per primitive -------------------------------------------------------------

def test_full_none():
    assert m1(full, 3).sum() == 9
    assert m1(none, 3).sum() == 0


def test_causal_flat_and_axis():
    assert rows(m1(causal, 3)) == [[0], [0, 1], [0, 1, 2]]
    m = Pattern.create(causal("t"), {"t": 2, "w": 2}).mask()[0].astype(int)
    # token 2 = (t=1, w=0) sees every t<=1; token 1 = (t=0, w=1) sees only t=0 tokens
    assert rows(m) == [[0, 1], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_window_and_sliding():
    assert rows(m1(window(before=1, after=0), 4)) == [[0], [0, 1], [1, 2], [2, 3]]
    assert rows(m1(sliding(1), 4)) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert rows(m1(window(before=INF, after=1), 3)) == [[0, 1], [0, 1, 2], [0, 1, 2]]
    # causal & sliding(r) sees r + 1 keys
    assert m1(causal & sliding(3), 16).sum(1)[8] == 4


def test_natten_borders_from_the_contract():
    r = rows(m1(neighborhood(window=5), 16))
    for q in (0, 1, 2):
        assert r[q] == [0, 1, 2, 3, 4]
    assert r[15] == [11, 12, 13, 14, 15]
    r = rows(m1(neighborhood(window=5, stride=5), 16))
    assert r[15] == [11, 12, 13, 14, 15]
    assert r[0] == r[4] == [0, 1, 2, 3, 4]


def test_natten_dilation_and_causal():
    r = rows(m1(neighborhood(window=3, dilation=2), 10))
    assert r[0] == [0, 2, 4] and r[1] == [1, 3, 5] and r[9] == [5, 7, 9]
    r = rows(m1(neighborhood(window=3, causal=True), 8))
    assert r[0] == [0] and r[1] == [0, 1] and r[5] == [3, 4, 5]


def test_natten_window_matches_reference_formula():
    # Causal stride: leader is the last of its stride group; end is the query itself.
    g, start, end = natten_window(np.arange(8), 8, 3, 1, 2, True)
    assert list(start) == [0, 0, 1, 1, 3, 3, 5, 5]
    assert list(end) == list(range(1, 9))


def test_block_and_shift():
    assert rows(m1(block(2), 5)) == [[0, 1], [0, 1], [2, 3], [2, 3], [4]]
    assert rows(m1(block(2, shift=1), 5)) == [[0], [1, 2], [1, 2], [3, 4], [3, 4]]


def test_strided_grid_axial():
    assert rows(m1(strided(2), 5)) == [[0, 2, 4], [1, 3], [0, 2, 4], [1, 3], [0, 2, 4]]
    assert (m1(grid(2), 6) == m1(strided(3), 6)).all()
    m = Pattern.create(axial("w"), (2, 3)).mask()[0].astype(int)
    assert rows(m)[4] == [3, 4, 5]
    m = Pattern.create(axial("h"), (2, 3)).mask()[0].astype(int)
    assert rows(m)[4] == [1, 4]


def test_halo():
    r = rows(m1(halo(block=2, halo=1), 6))
    assert r[0] == [0, 1, 2] and r[2] == [1, 2, 3, 4] and r[5] == [3, 4, 5]


def test_keys_queries_global_sink():
    assert rows(m1(keys(range(1, 3)), 3)) == [[1, 2]] * 3
    assert rows(m1(keys([0, 2]), 3)) == [[0, 2]] * 3
    assert rows(m1(queries(0, 1), 3)) == [[0, 1, 2], [], []]
    assert rows(m1(global_(0, 1) | sliding(0), 3)) == [[0, 1, 2], [0, 1], [0, 2]]
    assert (m1(sink(2), 4) == m1(keys(0, 2), 4)).all()


def test_random_is_deterministic_and_counts():
    a = m1(random(block=4, count=2, seed=7), 32)
    b = m1(random(block=4, count=2, seed=7), 32)
    assert (a == b).all()
    assert all(c == 8 for c in a.sum(1))  # 2 blocks of 4 keys
    assert random_blocks(7, 0, 8, 2) == random_blocks(7, 0, 8, 2)
    assert random_blocks(7, 0, 8, 8) == tuple(range(8))
    assert not (m1(random(block=4, count=2, seed=8), 32) == a).all()


def test_runtime_inputs():
    p = Pattern.create(causal & same("doc"), 6, inputs={"doc": "ids"})
    m = p.mask(inputs={"doc": np.array([0, 0, 1, 1, 1, 2])})[0].astype(int)
    assert rows(m) == [[0], [0, 1], [2], [2, 3], [2, 3, 4], [5]]
    p = Pattern.create(valid("len"), 4, inputs={"len": "length"})
    m = p.mask(inputs={"len": np.array(2)})[0].astype(int)
    assert rows(m) == [[0, 1], [0, 1], [], []]
    with pytest.raises(AttnError, match="runtime input"):
        p.mask()


def test_by_head():
    p = Pattern.create({(0, 2): causal, (2, 3): full}, 4, heads=3)
    m = p.mask()
    assert m.shape == (3, 4, 4)
    assert (m[0] == m1(causal, 4)).all() and m[2].all()


# --- canonical forms and printing ----------------------------------------------------------

def test_canonical_combinators():
    assert and_(full, causal) == causal
    assert and_(none, causal) == none
    assert or_(full, causal) == full
    assert not_(not_(causal)) == causal
    assert (causal - sliding(2)) == and_(causal, Not(sliding(2)))
    assert ((causal & sliding(1)) & block(2)).items == (causal, sliding(1), block(2))


def test_printing():
    p = Pattern.create(neighborhood(window=(3, 7, 7), dilation=(1, 2, 2)) & causal("t"), (4, 16, 16))
    assert "neighborhood(window = (3, 7, 7), dilation = (1, 2, 2)) & causal(t)" in p.to_attn()
    assert (causal - (sliding(2) | block(4))).to_attn() == "causal - (sliding(2) | block(4))"
    assert (~(causal & sliding(2))).to_attn() == "~(causal & sliding(2))"
    assert window(before=INF, after=0).to_attn() == "window(before = inf, after = 0)"


# --- validation errors ---------------------------------------------------------------------

@pytest.mark.parametrize("expr, tokens, words", [
    (neighborhood(window=9), 8, ["larger than axis n of size 8"]),
    (neighborhood(window=3, stride=4), 8, ["stride 4", "outside 1..window"]),
    (neighborhood(window=(3, 3)), 8, ["2 entries", "1 axes"]),
    (grid(3), 8, ["does not divide axis n of size 8"]),
    (axial("x"), (2, 2), ["unknown axis 'x'"]),
    (causal("hh"), (2, 2), ["unknown axis 'hh'", "did you mean 'h'"]),
    (block(9), 8, ["block size 9"]),
    (keys(0, 9), 8, ["outside the 8 tokens"]),
    (same("doc"), 8, ["no input named 'doc'"]),
])
def test_validation_messages(expr, tokens, words):
    with pytest.raises(AttnError) as e:
        Pattern.create(expr, tokens)
    for w in words:
        assert w in str(e.value)


def test_all_errors_collected():
    with pytest.raises(AttnError) as e:
        Pattern.create(neighborhood(window=9) & grid(3) & axial("q"), 8)
    assert len(e.value.diagnostics) == 3


def test_head_ranges_validated():
    with pytest.raises(AttnError, match="overlaps"):
        Pattern.create({(0, 2): causal, (1, 3): full}, 4, heads=3)
    with pytest.raises(AttnError, match="not covered"):
        Pattern.create({(0, 1): causal, (2, 3): full}, 4, heads=3)


# --- laws (hypothesis) ---------------------------------------------------------------------

@st.composite
def two_exprs(draw):
    lay = draw(layouts(max_n=64))
    return lay, draw(exprs(lay, 3)), draw(exprs(lay, 3)), draw(exprs(lay, 3))


def _m(e, lay):
    return Pattern.create(e, lay).mask()[0]


@given(two_exprs())
def test_boolean_algebra(t):
    lay, a, b, c = t
    A, B, C = _m(a, lay), _m(b, lay), _m(c, lay)
    assert (_m(a & b, lay) == (A & B)).all()
    assert (_m(a & b, lay) == _m(b & a, lay)).all()
    assert (_m(a | b, lay) == _m(b | a, lay)).all()
    assert (_m((a & b) & c, lay) == _m(a & (b & c), lay)).all()
    assert (_m((a | b) | c, lay) == _m(a | (b | c), lay)).all()
    assert (_m(~(a & b), lay) == _m(~a | ~b, lay)).all()
    assert (_m(~(a | b), lay) == _m(~a & ~b, lay)).all()
    assert (_m(a - b, lay) == _m(a & ~b, lay)).all()
    assert (_m(a - b, lay) == (A & ~B)).all()
    assert (_m(a | b, lay) == (A | B)).all() and (_m(~c, lay) == ~C).all()


@st.composite
def na_cases(draw):
    lay = draw(layouts(max_n=48))
    return lay, draw(neighborhoods(lay))


@given(na_cases())
def test_neighborhood_invariants(case):
    lay, na = case
    p = Pattern.create(na, lay)
    m = p.mask()[0]
    idx = np.arange(p.n)
    qc, kc = lay.coords(idx[:, None]), lay.coords(idx[None, :])
    for a in range(lay.rank):
        if na.causal[a]:
            assert not (m & (kc[a] > qc[a])).any(), "a causal axis never sees the future"
        # only keys of the query's dilation group
        assert not (m & (kc[a] % na.dilation[a] != qc[a] % na.dilation[a])).any()
    if not any(na.causal):
        assert (m.sum(1) == np.prod(na.window)).all(), "non-causal NA sees exactly prod(window) keys"


@given(st.data())
def test_block_and_strided_are_equivalence_relations(data):
    lay = data.draw(layouts(max_n=48))
    e = data.draw(st.one_of(
        st.tuples(*[st.integers(1, L) for L in lay.sizes]).map(lambda s: Block(s)),
        st.tuples(*[st.integers(1, L) for L in lay.sizes]).map(Strided)))
    m = Pattern.create(e, lay).mask()[0]
    assert m.diagonal().all() and (m == m.T).all()
    mi = m.astype(np.int64)
    assert ((mi @ mi > 0) == m).all(), "transitive"


@given(st.data())
def test_grid_groups_have_prod_g_members(data):
    lay = data.draw(layouts(max_n=48))
    G = tuple(data.draw(st.sampled_from([d for d in range(1, L + 1) if L % d == 0])) for L in lay.sizes)
    m = Pattern.create(Grid(G), lay).mask()[0]
    assert (m.sum(1) == np.prod(G)).all()


@given(patterns(max_n=64, max_leaves=4))
def test_by_head_mask_equals_branches(p):
    other = causal if not isinstance(p.attend, type(causal)) else full
    ph = Pattern.create({(0, 1): p.attend, (1, 3): other}, p.layout, heads=3)
    m = ph.mask()
    assert (m[0] == p.mask()[0]).all()
    assert (m[1] == m[2]).all()
    assert (m[1] == Pattern.create(other, p.layout).mask()[0]).all()
