"""Closed forms (sympy) equal the dense oracle's counts: allowed pairs and visited tiles."""
from hypothesis import given, settings, strategies as st

from attnlang.closed_form import derive, window_count
from attnlang.pattern import (
    Pattern, axial, block, causal, full, grid, keys, neighborhood, none, sliding, strided, window,
)
from attnlang.plan import Plan


def _check(expr, tokens, tile=None):
    p = Pattern.create(expr, tokens)
    cf = derive(p)
    assert cf is not None, expr
    m = p.mask()[0]
    assert cf.count() == int(m.sum()), (expr, tokens, str(cf.pairs))
    if tile is not None and cf.tiles is not None:
        assert cf.visited(tile) == Plan.from_mask(p, p.mask(), tile, tile).stats()["visited"]
    return cf


@settings(max_examples=25)
@given(st.integers(1, 300), st.integers(0, 320), st.integers(0, 320), st.integers(1, 64))
def test_1d_windows(n, b, f, tile):
    _check(causal & sliding(b), n, tile)
    _check(window(before=b, after=f), n, tile)
    _check(causal, n, tile)
    _check(full, n, tile)


@settings(max_examples=25)
@given(st.integers(1, 200), st.integers(1, 200), st.integers(0, 300), st.integers(0, 40))
def test_1d_partitions(n, size, shift, r):
    size = min(size, n)
    _check(block(size, shift=shift), n)
    _check(block(size) & causal, n)
    _check(block(size, shift=shift) & sliding(r), n)
    _check(strided(size) & causal, n)
    _check(strided(size) & window(before=r, after=r // 2), n)


@settings(max_examples=20)
@given(st.data())
def test_nd_conjunctions(data):
    sizes = tuple(data.draw(st.integers(2, 12)) for _ in range(data.draw(st.integers(2, 3))))
    names = ("h", "w") if len(sizes) == 2 else ("t", "h", "w")
    tokens = dict(zip(names, sizes))
    K = tuple(data.draw(st.integers(2, L)) for L in sizes)
    d = tuple(data.draw(st.integers(1, L // k)) for L, k in zip(sizes, K))
    c = tuple(data.draw(st.booleans()) for _ in sizes)
    s = tuple(1 if ci else data.draw(st.integers(1, k)) for ci, k in zip(c, K))
    _check(neighborhood(window=K, dilation=d, stride=s, causal=c), tokens)
    ax = data.draw(st.sampled_from(names))
    _check(axial(ax) & causal(ax), tokens)
    G = tuple(data.draw(st.sampled_from([g for g in range(1, L + 1) if L % g == 0])) for L in sizes)
    _check(grid(G) & causal(ax), tokens)
    S = tuple(data.draw(st.integers(1, L)) for L in sizes)
    _check(block(S) & causal(ax), tokens)
    _check(causal, tokens)  # flat causal alone on an N-D grid


def test_simple_form_and_symbols():
    cf = derive(Pattern.create(causal & sliding(256), 8192))
    assert str(cf.simple()) == "(2*N - r)*(r + 1)/2"
    assert cf.count(N=1 << 20) == (2 * (1 << 20) - 256) * 257 // 2
    assert cf.visited(128) == window_count(64, 2, 0)
    assert derive(Pattern.create(none, 64)).count() == 0


def test_unsupported_shapes_return_none():
    assert derive(Pattern.create(causal | sliding(3), 64)) is None
    assert derive(Pattern.create(keys(0, 4), 64)) is None
    assert derive(Pattern.create(block(4) & strided(2), 64)) is None
