"""Closed forms: allowed pairs, density and visited tiles as sympy expressions in the sizes.

For conjunctions of per-axis primitives (``causal``, ``window``/``sliding``, ``block``,
``strided``, ``grid``, ``axial``, ``neighborhood``; flat ``causal``/``window`` on 1-D layouts or
alone) the number of allowed ``(q, k)`` pairs factorises over the axes, and on each axis it is a
sum of *window counts* over segments (blocks, residue classes, dilation groups):

    W(L; b, f) = L (b + f + 1) - b (b + 1) / 2 - f (f + 1) / 2      (b, f clamped to L - 1)

>>> from attnlang import Pattern, causal, sliding
>>> cf = derive(Pattern.create(causal & sliding(256), tokens=8192))
>>> cf.simple()
(2*N - r)*(r + 1)/2
>>> cf.count(), cf.count(N=1 << 20)
(2072448, 269451136)

Other expressions (``|``, ``~``, ``keys``, ``random``, runtime inputs, ...) have no closed form
here: :func:`derive` returns ``None`` and callers count from the plan instead.

:func:`band_tile_range` gives the planner's per-query-tile key-tile ranges of 1-D bands and
blocks (the Triton kernels' loop bounds). Every sympy expression attnlang derives lives here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import sympy as sp

from attnlang.pattern import (
    INF, And, Axial, Block, Causal, Empty, Expr, Full, Grid, Halo, Keys, Layout, Neighborhood, Not,
    Or, Pattern, Queries, Random, Route, Same, Strided, Valid, Window,
)
from attnlang.plan import TileRange


@dataclass(frozen=True)
class ClosedForm:
    """Allowed pairs (and visited tiles when derivable) of one pattern, in symbolic sizes.

    ``tiles`` counts visited tiles for square tiles of ``B`` tokens in natural order (symbol
    ``B``), or is ``None``. ``values`` binds every symbol to the pattern's own value.
    """

    pairs: sp.Expr
    n: sp.Expr  # the token count N as an expression of the axis sizes
    values: Mapping[sp.Symbol, int]
    sizes: tuple[sp.Symbol, ...] = ()  # the axis-size symbols (N, or T, H, W)
    tiles: sp.Expr | None = None

    def _subs(self, overrides: Mapping[str, int]) -> dict[sp.Symbol, int]:
        vals = dict(self.values)
        by_name = {s.name: s for s in vals}
        for k, v in overrides.items():
            if k not in by_name:
                raise KeyError(f"no symbol '{k}' in this closed form (symbols: {', '.join(by_name)})")
            vals[by_name[k]] = int(v)
        return vals

    def density(self) -> sp.Expr:
        return self.pairs / self.n ** 2

    def count(self, **overrides: int) -> int:
        """Allowed pairs at the pattern's sizes, or with some symbols overridden (``N=4096``)."""
        return int(self.pairs.subs(self._subs(overrides)))

    def visited(self, block: int, **overrides: int) -> int | None:
        """Visited tiles with square tiles of ``block`` tokens, when derivable."""
        if self.tiles is None:
            return None
        vals = self._subs(overrides)
        vals[sp.Symbol("B", positive=True, integer=True)] = int(block)
        return int(self.tiles.subs(vals))

    def simple(self, expr: sp.Expr | None = None) -> sp.Expr:
        """The expression in the regime of small parameters (every ``Min`` takes the parameter
        side, e.g. ``r < N``): what a reader wants to see. ``count`` stays exact."""
        e = self.pairs if expr is None else expr
        sizes = set(self.sizes)

        def pick(*args):
            small = [a for a in args if not (a.free_symbols & sizes)]
            return small[0] if small else sp.Min(*args)

        return sp.simplify(e.replace(sp.Min, pick))

    def describe(self) -> dict[str, str]:
        out = {"pairs": str(self.simple()), "density": str(self.simple(self.density())),
               "pairs_exact": str(self.pairs),
               "symbols": ", ".join(f"{s}={v}" for s, v in self.values.items())}
        if self.tiles is not None:
            out["tiles"] = str(self.simple(self.tiles))
        return out


def window_count(L: Any, b: Any, f: Any) -> sp.Expr:
    """Pairs ``0 <= q, k < L`` with ``-b <= k - q <= f`` (``None`` = unbounded side)."""
    be = L - 1 if b is None else sp.Min(b, L - 1)
    fe = L - 1 if f is None else sp.Min(f, L - 1)
    return L * (be + fe + 1) - be * (be + 1) / 2 - fe * (fe + 1) / 2


@dataclass
class _Axis:
    """What the conjuncts constrain on one axis (merged windows, at most one partition)."""

    size: Any
    b: Any = None  # window before (None = unbounded)
    f: Any = None
    part: tuple | None = None  # ("block", S, o) | ("strided", s) | ("nbr", K, d, s, causal)


class _Unsupported(Exception):
    pass


class _Names:
    """Fresh sympy symbols bound to the pattern's values."""

    def __init__(self, layout: Layout):
        self.values: dict[sp.Symbol, int] = {}
        self.rank = layout.rank

    def sym(self, base: str, value: int, axis: str | None = None, size: bool = False) -> sp.Symbol:
        name = base if axis is None or self.rank == 1 else f"{base}_{axis}"
        by_name = {s.name: s for s in self.values}
        while name in by_name and self.values[by_name[name]] != value:
            name += "'"  # same role, different value (e.g. two windows): a fresh symbol
        if name in by_name:
            return by_name[name]
        # Sizes are positive, which lets sympy settle Min(0, N - 1) and friends.
        s = sp.Symbol(name, integer=True, positive=True) if size else sp.Symbol(name, integer=True, nonnegative=True)
        self.values[s] = int(value)
        return s


def derive(pattern: Pattern, head: int = 0) -> ClosedForm | None:
    """Closed form of one head's expression, or ``None`` when it is not a supported shape."""
    try:
        return _derive(pattern.expr_for_head(head), pattern.layout)
    except _Unsupported:
        return None


def _derive(expr: Expr, layout: Layout) -> ClosedForm:
    names = _Names(layout)
    items = expr.items if isinstance(expr, And) else (expr,)
    flat_only = all(isinstance(it, (Window, Full, Empty)) or (isinstance(it, Causal) and it.axis is None)
                    for it in items)
    if layout.rank > 1 and flat_only:
        # Flat constraints only: the grid is irrelevant, treat it as one axis of N tokens.
        layout = Layout.of(layout.n)
        names = _Names(layout)
    sizes = [names.sym("N" if layout.rank == 1 else a.name.upper(), a.size, size=True) for a in layout.axes]
    axes = [_Axis(s) for s in sizes]
    n_expr = sp.Mul(*sizes)
    for it in items:
        if isinstance(it, Empty):
            return ClosedForm(sp.Integer(0), n_expr, names.values, tuple(sizes), sp.Integer(0))
        _constrain(it, layout, axes, names)
    pairs = sp.Mul(*(_axis_pairs(ax) for ax in axes))
    tiles = _tiles(axes) if layout.rank == 1 else None
    return ClosedForm(pairs, n_expr, names.values, tuple(sizes), tiles)


def _window(ax: _Axis, b: Any, f: Any) -> None:
    """Intersect the axis' window with ``[-b, f]`` (``None`` = unbounded)."""
    ax.b = b if ax.b is None else (ax.b if b is None else sp.Min(ax.b, b))
    ax.f = f if ax.f is None else (ax.f if f is None else sp.Min(ax.f, f))


def _set_part(ax: _Axis, part: tuple) -> None:
    if ax.part is not None and ax.part != part:
        raise _Unsupported("two partitions on one axis")
    ax.part = part


def _constrain_causal(it: Causal, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    if it.axis is None and layout.rank > 1:
        raise _Unsupported("flat causal with per-axis primitives")
    _window(axes[0 if it.axis is None else layout.index(it.axis)], None, 0)


def _constrain_window(it: Window, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    if layout.rank > 1:
        raise _Unsupported("flat window with per-axis primitives")
    if it.before == it.after and it.before != INF:
        r = names.sym("r", it.before)
        _window(axes[0], r, r)
    else:
        _window(axes[0], None if it.before == INF else names.sym("b", it.before),
                None if it.after == INF else names.sym("f", it.after))


def _constrain_axial(it: Axial, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    for i, ax in enumerate(axes):
        if layout.names[i] != it.axis:
            _window(ax, 0, 0)


def _constrain_block(it: Block, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    an = layout.names
    for i, ax in enumerate(axes):
        o = it.shift[i] % it.size[i]
        _set_part(ax, ("block", names.sym("S", it.size[i], an[i]),
                       names.sym("o", o, an[i]) if o else sp.Integer(0)))


def _constrain_strided(it: Strided, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    for i, ax in enumerate(axes):
        _set_part(ax, ("strided", names.sym("s", it.step[i], layout.names[i])))


def _constrain_grid(it: Grid, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    for i, ax in enumerate(axes):
        # grid(G) == strided(L / G) with L % G == 0 (checked when the pattern was bound).
        _set_part(ax, ("strided", ax.size / names.sym("G", it.size[i], layout.names[i])))


def _constrain_neighborhood(it: Neighborhood, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    an = layout.names
    for i, ax in enumerate(axes):
        if it.causal[i] and it.stride[i] != 1:
            raise _Unsupported("causal neighborhood with stride > 1")
        _set_part(ax, ("nbr", names.sym("K", it.window[i], an[i]), names.sym("d", it.dilation[i], an[i]),
                       bool(it.causal[i])))


# The closed-form table: how each conjunct of a supported conjunction constrains the axes.
# A node type missing here has no closed form (``derive`` returns None); CONSTRAIN_LEAVES_OUT
# names those on purpose and says why.
CONSTRAIN: dict[type, Callable[[Any, Layout, list[_Axis], _Names], None]] = {
    Full: lambda it, layout, axes, names: None,
    Causal: _constrain_causal,
    Window: _constrain_window,
    Axial: _constrain_axial,
    Block: _constrain_block,
    Strided: _constrain_strided,
    Grid: _constrain_grid,
    Neighborhood: _constrain_neighborhood,
}

CONSTRAIN_LEAVES_OUT: dict[type, str] = {
    Empty: "zero pairs: _derive answers before constraining",
    And: "the conjunction _derive itself splits into conjuncts",
    Or: "a union does not factorise over the axes",
    Not: "a complement does not factorise over the axes",
    Halo: "overlapping halos at the axis ends: no single window count (not derived yet)",
    Keys: "depends on the listed indices, not on sizes alone",
    Queries: "depends on the listed indices, not on sizes alone",
    Random: "depends on the drawn blocks, not on sizes alone",
    Same: "depends on runtime ids",
    Valid: "depends on a runtime length",
    Route: "depends on Q/K content",
}


def _constrain(it: Expr, layout: Layout, axes: list[_Axis], names: _Names) -> None:
    rule = CONSTRAIN.get(type(it))
    if rule is None:
        raise _Unsupported(type(it).__name__)
    rule(it, layout, axes, names)


def _axis_pairs(ax: _Axis) -> sp.Expr:
    L, part = ax.size, ax.part
    if part is None:
        return window_count(L, ax.b, ax.f)
    kind = part[0]
    if kind == "block":
        _, S, o = part
        first = sp.Min(o, L)
        rest = L - first
        return (window_count(first, ax.b, ax.f) + sp.floor(rest / S) * window_count(S, ax.b, ax.f)
                + window_count(sp.Mod(rest, S), ax.b, ax.f))
    if kind == "strided":
        s = part[1]
        m, t = sp.floor(L / s), sp.Mod(L, s)
        # A window on the flat axis is a window of floor(b / s) steps inside a residue class.
        b = None if ax.b is None else sp.floor(ax.b / s)
        f = None if ax.f is None else sp.floor(ax.f / s)
        return t * window_count(m + 1, b, f) + (s - t) * window_count(m, b, f)
    _, K, d, causal = part
    if ax.b is not None or ax.f is not None:
        raise _Unsupported("neighborhood with a window on the same axis")
    if not causal:
        return L * K  # borders shift the window, never cut it: K keys per query
    m, t = sp.floor(L / d), sp.Mod(L, d)
    return t * window_count(m + 1, K - 1, 0) + (d - t) * window_count(m, K - 1, 0)


def _tiles(axes: list[_Axis]) -> sp.Expr | None:
    """Visited square tiles of ``B`` tokens on a 1-D axis in natural order, when derivable."""
    ax = axes[0]
    B = sp.Symbol("B", positive=True, integer=True)
    T = sp.ceiling(ax.size / B)
    if ax.part is None:
        # Query tile i sees key tiles i - ceil(b / B) .. i + ceil(f / B), clamped to the axis.
        cb = None if ax.b is None else sp.ceiling(ax.b / B)
        cf = None if ax.f is None else sp.ceiling(ax.f / B)
        return window_count(T, cb, cf)
    return None


@functools.lru_cache(maxsize=256)
def band_tile_range(band_lo: float, band_hi: float, blocks: tuple[tuple[int, int], ...],
                    n: int, bm: int, bn: int):
    """The key tiles of query tile ``qt`` under a 1-D band-and-blocks conjunction, for tiles of
    ``bm`` x ``bn`` tokens in natural order, as a sympy :class:`~attnlang.plan.TileRange` (the
    codegen's loop bounds), and numpy versions of its four bounds (the planner keeps the range
    only where they reproduce its tables).

    ``band_lo``/``band_hi`` bound ``k - q`` (``±INF``: open); each block is ``(size, shift)``.
    Cached: deriving costs milliseconds, and a serving loop plans the same shapes again.
    """
    qt = sp.Symbol("qt", integer=True, nonnegative=True)
    qmin, qmax = qt * bm, sp.Min(qt * bm + bm - 1, n - 1)
    qmax_c = qt * bm + bm - 1  # a complete query tile
    lo_k, hi_k = [sp.Integer(0)], [sp.Integer(n - 1)]
    flo, fhi = [sp.Integer(0)], [sp.Integer(n - 1)]
    if band_lo != -INF:
        lo_k.append(qmin + int(band_lo))
        flo.append(qmax_c + int(band_lo))
    if band_hi != INF:
        hi_k.append(qmax + int(band_hi))
        fhi.append(qmin + int(band_hi))
    for S, o in blocks:
        lo_k.append(sp.floor((qmin - o) / sp.Integer(S)) * S + o)
        hi_k.append(sp.floor((qmax - o) / sp.Integer(S)) * S + o + S - 1)
        flo.append(sp.floor((qmax_c - o) / sp.Integer(S)) * S + o)
        fhi.append(sp.floor((qmin - o) / sp.Integer(S)) * S + o + S - 1)
    # floor/ceiling are monotone, so they move inside Max/Min, where sympy's canonical forms
    # simplify each bound (floor((64*qt - 256)/64) -> qt - 4) without a costly simplify().
    lo = sp.Max(*(sp.floor(x / bn) for x in lo_k))
    hi = sp.Min(*(sp.floor(x / bn) for x in hi_k)) + 1
    full_lo = sp.Max(*(sp.ceiling(x / bn) for x in flo))
    full_hi = sp.Min(*(sp.floor((x + 1) / bn) for x in fhi), n // bn)
    if n % bm:
        full_hi = sp.Piecewise((full_hi, qt < n // bm), (full_lo, True))
    tr = TileRange(lo, hi, full_lo, full_hi)
    return tr, tuple(sp.lambdify(qt, e, "numpy") for e in (lo, hi, full_lo, full_hi))


__all__ = ["ClosedForm", "band_tile_range", "derive", "window_count", "CONSTRAIN", "CONSTRAIN_LEAVES_OUT"]
