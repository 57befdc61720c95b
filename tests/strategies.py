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


@st.composite
def by_head_patterns(draw, max_n: int = 32, max_heads: int = 6, max_leaves: int = 3):
    """``(Pattern, .attn text)`` of a 1-D ``by head`` pattern whose ranges partition
    ``0..heads`` at random and are listed in a random order (not necessarily ascending)."""
    heads = draw(st.integers(2, max_heads))
    layout = draw(layouts(1, max_n))
    cuts = sorted(draw(st.sets(st.integers(1, heads - 1), max_size=heads - 1)))
    bounds = [0, *cuts, heads]
    ranges = list(zip(bounds, bounds[1:]))
    ranges = draw(st.permutations(ranges))
    branches = {r: draw(exprs(layout, max_leaves)) for r in ranges}
    p = Pattern.create(branches, layout, heads=heads)
    body = "\n".join(f"        {lo}..{hi}: {e.to_attn()}" for (lo, hi), e in branches.items())
    text = (f"pattern p {{\n    tokens {layout.to_attn()}\n    heads {heads}\n"
            f"    attend by head {{\n{body}\n    }}\n}}\n")
    return p, text


def extreme_ints(L: int):
    """Integers at the edges of what a parameter on an axis of ``L`` tokens can mean, and of the
    machine widths a backend might squeeze them into (int32, int64), with negatives."""
    edges = [0, 1, 2, L - 1, L, L + 1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 10**30,
             -1, -(2**31), -(2**63), -(10**30)]
    return st.one_of(st.sampled_from(edges), st.integers(0, 2 * L))


@st.composite
def extreme_primitives(draw, L: int):
    """``(python builder thunk, .attn text)`` of one 1-D primitive on ``n[L]`` whose integer
    arguments are drawn from :func:`extreme_ints`. The builder is called by the test, since a
    builder may refuse a value (a negative size) with an AttnError at construction."""
    from attnlang import pattern as P

    x = extreme_ints(L)
    kind = draw(st.sampled_from(["sliding", "window"] * 3 + [  # the ones that take any size
        "block", "strided", "grid", "halo", "neighborhood", "keys", "queries", "sink", "random"]))
    if kind == "window":
        b, a = (draw(st.one_of(x, st.just(P.INF))) for _ in range(2))
        fmt = lambda v: "inf" if v == P.INF else str(v)  # noqa: E731
        return (lambda: P.window(b, a)), f"window(before = {fmt(b)}, after = {fmt(a)})"
    if kind in ("keys", "queries"):
        lo, hi = draw(x), draw(x)
        return (lambda: getattr(P, kind)(lo, hi)), f"{kind}({lo}..{hi})"
    if kind == "block":
        s, o = draw(x), draw(x)
        return (lambda: P.block(s, o)), f"block(size = {s}, shift = {o})"
    if kind == "halo":
        b, h = draw(x), draw(x)
        return (lambda: P.halo(b, h)), f"halo(block = {b}, halo = {h})"
    if kind == "neighborhood":
        K, d, s = draw(x), draw(x), draw(x)
        return (lambda: P.neighborhood(K, d, s)), f"neighborhood(window = {K}, dilation = {d}, stride = {s})"
    if kind == "random":
        b, c, z = draw(x), draw(x), draw(x)
        return (lambda: P.random(b, c, z)), f"random(block = {b}, count = {c}, seed = {z})"
    v = draw(x)
    return (lambda: getattr(P, kind)(v)), f"{kind}({v})"
