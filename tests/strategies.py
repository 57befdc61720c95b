"""Hypothesis strategies: random well-formed layouts and patterns (trees of primitives).

Every generated pattern is valid for its layout, so ``Pattern.create`` never raises on it.
Sizes stay small (N <= 512) so dense masks are cheap oracles.
"""
from __future__ import annotations

from hypothesis import strategies as st

from attnlang.pattern import (
    INF, Axial, Block, Causal, Empty, Full, Grid, Halo, Indices, Keys, Layout, Neighborhood,
    Pattern, Queries, Random, Range, Strided, Window, and_, not_, or_,
)

AXIS_NAMES = {1: ("n",), 2: ("h", "w"), 3: ("t", "h", "w")}


@st.composite
def layouts(draw, max_rank: int = 3, max_n: int = 512) -> Layout:
    rank = draw(st.integers(1, max_rank))
    if rank == 1:
        sizes = (draw(st.integers(4, max_n)),)
    elif rank == 2:
        sizes = (draw(st.integers(4, 20)), draw(st.integers(4, 20)))
    else:
        sizes = (draw(st.integers(2, 6)), draw(st.integers(3, 10)), draw(st.integers(3, 10)))
    return Layout.of(dict(zip(AXIS_NAMES[rank], sizes)))


def _per_axis(draw, layout: Layout, each) -> tuple:
    vals = tuple(draw(each(L)) for L in layout.sizes)
    return vals


@st.composite
def neighborhoods(draw, layout: Layout):
    window, dilation, stride, causal = [], [], [], []
    for L in layout.sizes:
        K = draw(st.integers(2, max(2, min(L, 9))))
        d = draw(st.integers(1, max(1, L // K)))
        window.append(K)
        dilation.append(d)
        stride.append(draw(st.integers(1, K)))
        causal.append(draw(st.booleans()))
    return Neighborhood(tuple(window), tuple(dilation), tuple(stride), tuple(causal))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def primitives(layout: Layout):
    """A strategy for one valid static primitive on ``layout``."""
    n = layout.n
    names = layout.names
    bounded = st.integers(0, max(1, n // 2))
    opts = [
        st.just(Full()),
        st.just(Empty()),
        st.just(Causal()),
        st.sampled_from(names).map(Causal),
        st.builds(Window, st.one_of(bounded, st.just(INF)), st.one_of(bounded, st.just(INF))),
        bounded.map(lambda r: Window(r, r)),
        neighborhoods(layout),
        st.builds(lambda s, o: Block(s, o),
                  st.tuples(*[st.integers(1, L) for L in layout.sizes]),
                  st.tuples(*[st.integers(0, L) for L in layout.sizes])),
        st.tuples(*[st.integers(1, L) for L in layout.sizes]).map(Strided),
        st.tuples(*[st.sampled_from(_divisors(L)) for L in layout.sizes]).map(Grid),
        st.sampled_from(names).map(Axial),
        st.builds(Halo, st.tuples(*[st.integers(1, L) for L in layout.sizes]),
                  st.tuples(*[st.integers(0, max(0, L // 2)) for L in layout.sizes])),
        st.integers(0, n).flatmap(lambda lo: st.integers(lo, n).map(lambda hi: Keys(Range(lo, hi)))),
        st.integers(0, n).flatmap(lambda lo: st.integers(lo, n).map(lambda hi: Queries(Range(lo, hi)))),
        st.lists(st.integers(0, n - 1), min_size=1, max_size=6).map(lambda v: Keys(Indices(tuple(v)))),
        st.lists(st.integers(0, n - 1), min_size=1, max_size=6).map(lambda v: Queries(Indices(tuple(v)))),
        st.integers(1, n).flatmap(
            lambda b: st.builds(Random, st.just(b), st.integers(0, -(-n // b)), st.integers(0, 1000))),
    ]
    return st.one_of(opts)


def exprs(layout: Layout, max_leaves: int = 5):
    """Random trees of primitives under ``&``, ``|``, ``-`` and ``~`` (canonical forms)."""
    return st.recursive(
        primitives(layout),
        lambda children: st.one_of(
            st.tuples(children, children).map(lambda ab: and_(*ab)),
            st.tuples(children, children).map(lambda ab: or_(*ab)),
            st.tuples(children, children).map(lambda ab: and_(ab[0], not_(ab[1]))),
            children.map(not_),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def patterns(draw, max_rank: int = 3, max_n: int = 512, max_leaves: int = 5) -> Pattern:
    """A bound, valid Pattern on a random layout (no runtime inputs, no ``by head``)."""
    layout = draw(layouts(max_rank, max_n))
    return Pattern.create(draw(exprs(layout, max_leaves)), layout)


@st.composite
def pattern_and_masks(draw, **kw):
    p = draw(patterns(**kw))
    return p, p.mask()
