"""The Pattern IR: what each query may see, with exact semantics and no notion of tiles.

An expression tree (:class:`Expr`) of primitives (LANGUAGE.md §3) combined with ``&``, ``|``,
``-`` and ``~``, bound to a token :class:`Layout` inside a :class:`Pattern`. Every node has
``allowed(q, k, env)``: a vectorised predicate over token coordinates, which *is* the meaning of
the language. The dense reference, the planner's property tests and every backend are measured
against it.

Python builders are plain values and functions of this module::

    >>> from attnlang import causal, sliding, Pattern
    >>> p = Pattern.create(causal & sliding(2), tokens=6)
    >>> p.mask()[0].astype(int)[3]
    array([0, 1, 1, 1, 0, 0])

Nodes store per-axis arguments as the user gave them (a scalar or a tuple); ``Pattern.create``
binds the expression to the layout once, turning every per-axis scalar into a tuple of the
layout's rank and collecting every validation error with its source span. Code past that
boundary (planner, codegen, backends) may assume bound, canonical nodes.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from attnlang.errors import AttnError, Diagnostic, Span, did_you_mean

INF = math.inf
PerAxis = Any  # int | tuple[int, ...] before binding; tuple[int, ...] after


def _span() -> Any:
    return field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------------

DEFAULT_AXIS_NAMES = {1: ("n",), 2: ("h", "w"), 3: ("t", "h", "w")}


@dataclass(frozen=True)
class Axis:
    """One named axis of the token grid (``t[16]``)."""

    name: str
    size: int
    span: Span | None = _span()


@dataclass(frozen=True)
class Layout:
    """The token grid ``tokens t[T], h[H], w[W]``; flat index is row-major over the axes."""

    axes: tuple[Axis, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def n(self) -> int:
        return math.prod(self.sizes)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def coords(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-axis coordinates of flat token indices (row-major)."""
        out = []
        rest = np.asarray(flat)
        for size in reversed(self.sizes):
            out.append(rest % size)
            rest = rest // size
        return tuple(reversed(out))

    def points(self, flat: np.ndarray) -> "Points":
        flat = np.asarray(flat, dtype=np.int64)
        return Points(flat, self.coords(flat))

    def to_attn(self) -> str:
        return ", ".join(f"{a.name}[{a.size}]" for a in self.axes)

    @staticmethod
    def of(tokens: Any) -> "Layout":
        """Normalise ``8192``, ``(16, 32, 32)``, ``{"t": 16, "h": 32}`` or a Layout."""
        if isinstance(tokens, Layout):
            return tokens
        if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
            pairs = [("n", int(tokens))]
        elif isinstance(tokens, Mapping):
            pairs = [(str(k), v) for k, v in tokens.items()]
        elif isinstance(tokens, (tuple, list)) and tokens:
            if all(isinstance(t, (tuple, list)) and len(t) == 2 for t in tokens):
                pairs = [(str(a), s) for a, s in tokens]
            else:
                names = DEFAULT_AXIS_NAMES.get(len(tokens), tuple(f"a{i}" for i in range(len(tokens))))
                pairs = list(zip(names, tokens))
        else:
            raise AttnError(
                f"tokens={tokens!r} is not a token layout",
                hint="give an int (1-D length), a tuple of axis sizes like (16, 32, 32), "
                "or a dict like {'t': 16, 'h': 32, 'w': 32}",
            )
        bad = [(a, s) for a, s in pairs
               if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1]
        if bad:
            raise AttnError(f"axis sizes must be positive integers, got {dict(bad)!r}")
        names = [a for a, _ in pairs]
        if len(set(names)) != len(names):
            raise AttnError(f"axis names must be distinct, got {names}")
        return Layout(tuple(Axis(a, int(s)) for a, s in pairs))


@dataclass(frozen=True)
class Points:
    """Token positions, vectorised: flat indices and their per-axis coordinates (broadcastable)."""

    flat: np.ndarray
    coord: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Env:
    """What a predicate may read besides coordinates: the layout and one batch item's inputs."""

    layout: Layout
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)  # name -> ids [N] or length []
    head: int = 0
    # Content decisions computed once per call from Q/K (LANGUAGE.md §6): for a Route ``r``,
    # ``content[r]`` is bool [Hq, query groups, key blocks]; with permute_keys also
    # ``content[(r, "perm")]`` (permuted position -> key) and ``content[(r, "pos")]`` (its
    # inverse), int [Hq, N]. See attnlang.routing.
    content: Mapping[Any, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------

class Expr:
    """Base of every pattern expression; combine with ``&``, ``|``, ``-`` and ``~``."""

    span: Span | None

    def allowed(self, q: Points, k: Points, env: Env) -> np.ndarray:
        """Boolean array broadcast over ``q`` and ``k``: may query ``q`` see key ``k``."""
        raise NotImplementedError(type(self).__name__)

    def bind(self, layout: Layout, out: list[Diagnostic]) -> "Expr":
        """Normalise per-axis arguments to the layout's rank; append problems to ``out``."""
        return self

    def children(self) -> tuple["Expr", ...]:
        return ()

    def to_attn(self) -> str:
        raise NotImplementedError(type(self).__name__)

    def walk(self) -> Iterator["Expr"]:
        yield self
        for c in self.children():
            yield from c.walk()

    def __and__(self, other: "Expr") -> "Expr":
        return and_(self, _expr(other))

    def __or__(self, other: "Expr") -> "Expr":
        return or_(self, _expr(other))

    def __sub__(self, other: "Expr") -> "Expr":
        return and_(self, not_(_expr(other)))

    def __invert__(self) -> "Expr":
        return not_(self)

    def __str__(self) -> str:
        return self.to_attn()


def _expr(x: Any) -> Expr:
    if not isinstance(x, Expr):
        raise TypeError(f"cannot combine a pattern with {type(x).__name__} {x!r}")
    return x


# --- helpers for per-axis arguments ---------------------------------------------------------

def _fmt_axis(v: Any) -> str:
    if isinstance(v, tuple):
        if len(set(v)) == 1:
            return _fmt_scalar(v[0])
        return "(" + ", ".join(_fmt_scalar(x) for x in v) + ")"
    return _fmt_scalar(v)


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == INF:
        return "inf"
    return str(v)


def _per_axis(node: Expr, name: str, value: Any, layout: Layout, out: list[Diagnostic],
              kind: type = int) -> tuple:
    """Broadcast a scalar to the layout's rank, check a tuple's length and entry types."""
    vals = value if isinstance(value, tuple) else (value,) * layout.rank
    if len(vals) != layout.rank:
        out.append(Diagnostic(
            f"{_prim_name(node)} {name} ({', '.join(map(_fmt_scalar, vals))}) has {len(vals)} entries but the layout "
            f"{layout.to_attn()} has {layout.rank} axes",
            node.span, f"give one value per axis ({', '.join(layout.names)}) or a single value for all"))
        return (vals[0],) * layout.rank if vals else (0,) * layout.rank
    for v in vals:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, (int, np.integer)) and not isinstance(v, bool))
        if not ok:
            out.append(Diagnostic(
                f"{_prim_name(node)} {name} must be {'a boolean' if kind is bool else 'an integer'} "
                f"per axis, got {v!r}", node.span))
            return (False if kind is bool else 1,) * layout.rank
    return tuple(bool(v) if kind is bool else int(v) for v in vals)


def check_boxes(node: Any, prim: str, boxes: Mapping[str, tuple], layout: Layout, out: list[Diagnostic]) -> None:
    """Every entry of each named box lies in ``1..L`` of its axis (route / pyramid blocks)."""
    for name, box in boxes.items():
        for a, L in enumerate(layout.sizes):
            _check(1 <= box[a] <= L, out, node,
                   f"{prim} {name} {box[a]} on axis {layout.names[a]} is outside 1..{L} (the axis size)",
                   f"valid: 1 <= {name} <= {L}")


def _prim_name(node: Expr) -> str:
    return _PRIM_NAMES.get(type(node), type(node).__name__.lower())


def _check(cond: bool, out: list[Diagnostic], node: Expr, message: str, hint: str | None = None) -> None:
    if not cond:
        out.append(Diagnostic(message, node.span, hint))


def clamp_extent(v: int | float, n: int) -> int | float:
    """A distance of ``n`` or more on an axis of ``n`` tokens reaches every token: it means
    ``inf``, and binding stores it as ``inf`` so no backend ever sees an integer wider than the
    axis (``sliding(2**63)`` on 16 tokens is ``sliding(inf)``, never a wrapped int64)."""
    return INF if v == INF or v >= n else int(v)


# --- constants ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Full(Expr):
    """Every query sees every key (``full``)."""

    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.ones(np.broadcast_shapes(q.flat.shape, k.flat.shape), dtype=bool)

    def to_attn(self):
        return "full"


@dataclass(frozen=True)
class Empty(Expr):
    """No query sees any key (``none``)."""

    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.zeros(np.broadcast_shapes(q.flat.shape, k.flat.shape), dtype=bool)

    def to_attn(self):
        return "none"


# --- flat-order primitives ----------------------------------------------------------------

@dataclass(frozen=True)
class Causal(Expr):
    """``k <= q`` in flat order, or ``k_a <= q_a`` on one axis when ``axis`` is given."""

    axis: str | None = None
    span: Span | None = _span()

    def __call__(self, axis: str) -> "Causal":
        return Causal(axis)

    def allowed(self, q, k, env):
        if self.axis is None:
            return k.flat <= q.flat
        a = env.layout.index(self.axis)
        return k.coord[a] <= q.coord[a]

    def bind(self, layout, out):
        if self.axis is not None and self.axis not in layout.names:
            out.append(Diagnostic(
                f"causal: unknown axis '{self.axis}'{did_you_mean(self.axis, layout.names)}",
                self.span, f"axes of this layout: {', '.join(layout.names)}"))
        return self

    def to_attn(self):
        return "causal" if self.axis is None else f"causal({self.axis})"


@dataclass(frozen=True)
class Window(Expr):
    """``-before <= k - q <= after`` in flat order; either side may be ``inf``."""

    before: int | float
    after: int | float
    span: Span | None = _span()

    def allowed(self, q, k, env):
        d = k.flat - q.flat
        return (d >= -self.before) & (d <= self.after)

    def bind(self, layout, out):
        vals = []
        for name, v in (("before", self.before), ("after", self.after)):
            ok = v == INF or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0)
            _check(ok, out, self, f"window {name} = {_fmt_scalar(v)} must be a non-negative integer or inf")
            vals.append(clamp_extent(v, layout.n) if ok else v)
        return replace(self, before=vals[0], after=vals[1])

    def to_attn(self):
        if self.before == self.after and self.before != INF:
            return f"sliding({self.before})"
        return f"window(before = {_fmt_scalar(self.before)}, after = {_fmt_scalar(self.after)})"


@dataclass(frozen=True)
class Range:
    """Half-open flat index range ``lo..hi``."""

    lo: int
    hi: int

    def contains(self, x: np.ndarray) -> np.ndarray:
        return (x >= self.lo) & (x < self.hi)

    def to_attn(self) -> str:
        return f"{self.lo}..{self.hi}"


@dataclass(frozen=True)
class Indices:
    """An explicit list of flat indices ``[i, j, ...]`` (sorted, unique after binding)."""

    values: tuple[int, ...]

    def contains(self, x: np.ndarray) -> np.ndarray:
        return np.isin(x, np.asarray(self.values, dtype=np.int64))

    def to_attn(self) -> str:
        return "[" + ", ".join(str(v) for v in self.values) + "]"


Selection = Range | Indices


def _check_selection(node: Expr, sel: Selection, layout: Layout, out: list[Diagnostic]) -> Selection:
    n = layout.n
    if isinstance(sel, Range):
        _check(0 <= sel.lo <= sel.hi <= n, out, node,
               f"{_prim_name(node)}: range {sel.to_attn()} is outside the {n} tokens",
               f"valid: 0 <= lo <= hi <= {n}")
        return sel
    bad = [v for v in sel.values if not 0 <= v < n]
    _check(not bad, out, node, f"{_prim_name(node)}: indices {bad} are outside the {n} tokens",
           f"valid: 0 <= index < {n}")
    return Indices(tuple(sorted(set(sel.values))))


@dataclass(frozen=True)
class Keys(Expr):
    """Key ``k`` lies in a range or list (``keys(0..4)``)."""

    sel: Selection
    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.broadcast_to(self.sel.contains(k.flat), np.broadcast_shapes(q.flat.shape, k.flat.shape))

    def bind(self, layout, out):
        return replace(self, sel=_check_selection(self, self.sel, layout, out))

    def to_attn(self):
        return f"keys({self.sel.to_attn()})"


@dataclass(frozen=True)
class Queries(Expr):
    """Query ``q`` lies in a range or list (``queries(0..4)``)."""

    sel: Selection
    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.broadcast_to(self.sel.contains(q.flat), np.broadcast_shapes(q.flat.shape, k.flat.shape))

    def bind(self, layout, out):
        return replace(self, sel=_check_selection(self, self.sel, layout, out))

    def to_attn(self):
        return f"queries({self.sel.to_attn()})"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def random_blocks(seed: int, query_block: int, n_blocks: int, count: int) -> tuple[int, ...]:
    """The key blocks ``random(block, count, seed)`` gives one query block: part of the spec.

    Floyd's sampling of ``count`` distinct blocks from ``n_blocks``, driven by a SplitMix64
    stream seeded with ``(seed, query_block)`` — plain integer arithmetic, so every machine and
    every backend draws the same blocks.
    """
    state = _splitmix64((seed & 0xFFFFFFFF) << 32 | (query_block & 0xFFFFFFFF))
    chosen: set[int] = set()
    for j in range(n_blocks - min(count, n_blocks), n_blocks):
        state = _splitmix64(state)
        t = state % (j + 1)
        chosen.add(j if t in chosen else t)
    return tuple(sorted(chosen))


@dataclass(frozen=True)
class Random(Expr):
    """BigBird random blocks: each query block of ``block`` flat tokens sees ``count`` key blocks."""

    block: int
    count: int
    seed: int = 0
    span: Span | None = _span()

    def n_blocks(self, layout: Layout) -> int:
        return -(-layout.n // self.block)

    def table(self, layout: Layout) -> np.ndarray:
        """bool [query blocks, key blocks]: the drawn blocks."""
        nb = self.n_blocks(layout)
        t = np.zeros((nb, nb), dtype=bool)
        for i in range(nb):
            t[i, list(random_blocks(self.seed, i, nb, self.count))] = True
        return t

    def allowed(self, q, k, env):
        t = self.table(env.layout)
        return t[q.flat // self.block, k.flat // self.block]

    def bind(self, layout, out):
        ok = isinstance(self.block, int) and 1 <= self.block <= layout.n
        _check(ok, out, self, f"random block = {self.block} must be between 1 and N = {layout.n}")
        if ok:
            nb = self.n_blocks(layout)
            _check(isinstance(self.count, int) and 0 <= self.count <= nb, out, self,
                   f"random count = {self.count} must be between 0 and the {nb} key blocks")
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**32, out, self,
               f"random seed = {self.seed} must be an integer in 0..{2**32 - 1}",
               "the generator reads 32 bits of the seed: a larger one would draw the blocks of another seed")
        return self

    def to_attn(self):
        return f"random(block = {self.block}, count = {self.count}, seed = {self.seed})"


# --- per-axis primitives ------------------------------------------------------------------

def natten_window(i: np.ndarray, L: int, K: int, d: int, s: int, causal: bool):
    """NATTEN/GNA window of query coordinate(s) ``i`` on one axis (LANGUAGE.md §3.1).

    Returns ``(group, start, end)``: the dilation group and the half-open range of in-group
    key coordinates the query sees.
    """
    i = np.asarray(i)
    g = i % d
    ip = i // d
    lg = (L - g + d - 1) // d
    if causal:
        leader = np.minimum((ip // s) * s + s - 1, lg - 1)
        start = np.maximum(leader - (K - 1), 0)
        end = np.minimum(ip + 1, lg)
    else:
        leader = np.minimum((ip // s) * s + s // 2, lg - 1)
        start = np.clip(leader - K // 2, 0, lg - K)
        end = start + K
    return g, start, end


@dataclass(frozen=True)
class Neighborhood(Expr):
    """NATTEN / GNA neighborhood attention per axis: window, dilation, stride, causal."""

    window: PerAxis
    dilation: PerAxis = 1
    stride: PerAxis = 1
    causal: PerAxis = False
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = None
        for a, L in enumerate(env.layout.sizes):
            K, d, s, c = self.window[a], self.dilation[a], self.stride[a], self.causal[a]
            g, start, end = natten_window(q.coord[a], L, K, d, s, c)
            kp = k.coord[a] // d
            here = (k.coord[a] % d == g) & (kp >= start) & (kp < end)
            ok = here if ok is None else ok & here
        return ok

    def bind(self, layout, out):
        n0 = len(out)
        K = _per_axis(self, "window", self.window, layout, out)
        d = _per_axis(self, "dilation", self.dilation, layout, out)
        s = _per_axis(self, "stride", self.stride, layout, out)
        c = _per_axis(self, "causal", self.causal, layout, out, kind=bool)
        if len(out) == n0:
            for a, L in enumerate(layout.sizes):
                ax = layout.names[a]
                _check(K[a] >= 2, out, self, f"neighborhood window {K[a]} on axis {ax} is too small",
                       "valid: window >= 2")
                _check(d[a] >= 1, out, self, f"neighborhood dilation {d[a]} on axis {ax} must be >= 1")
                if K[a] >= 2 and d[a] >= 1:
                    _check(K[a] * d[a] <= L, out, self,
                           f"neighborhood window {K[a]} x dilation {d[a]} = {K[a] * d[a]} is larger "
                           f"than axis {ax} of size {L}",
                           f"valid: window * dilation <= {L}")
                    _check(1 <= s[a] <= K[a], out, self,
                           f"neighborhood stride {s[a]} on axis {ax} is outside 1..window = {K[a]}",
                           "valid: 1 <= stride <= window")
        return replace(self, window=K, dilation=d, stride=s, causal=c)

    def to_attn(self):
        args = [f"window = {_fmt_axis(self.window)}"]
        if self.dilation not in (1, (1,) * _len(self.dilation)):
            args.append(f"dilation = {_fmt_axis(self.dilation)}")
        if self.stride not in (1, (1,) * _len(self.stride)):
            args.append(f"stride = {_fmt_axis(self.stride)}")
        if any(_as_tuple(self.causal)):
            args.append(f"causal = {_fmt_axis(self.causal)}")
        return f"neighborhood({', '.join(args)})"


def _len(v: Any) -> int:
    return len(v) if isinstance(v, tuple) else 1


def _as_tuple(v: Any) -> tuple:
    return v if isinstance(v, tuple) else (v,)


@dataclass(frozen=True)
class Block(Expr):
    """Block partition: ``floor((x - shift) / size)`` equal on every axis (Swin with a shift)."""

    size: PerAxis
    shift: PerAxis = 0
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = None
        for a in range(env.layout.rank):
            S, o = self.size[a], self.shift[a]
            here = (q.coord[a] - o) // S == (k.coord[a] - o) // S
            ok = here if ok is None else ok & here
        return ok

    def bind(self, layout, out):
        n0 = len(out)
        S = _per_axis(self, "size", self.size, layout, out)
        o = _per_axis(self, "shift", self.shift, layout, out)
        if len(out) == n0:
            for a, L in enumerate(layout.sizes):
                _check(1 <= S[a] <= L, out, self,
                       f"block size {S[a]} on axis {layout.names[a]} is outside 1..{L} (the axis size)",
                       f"valid: 1 <= size <= {L}")
            # Only the shift modulo the size matters (both floors move by the same integer):
            # stored as 0..size-1 so a huge or negative shift never reaches int64/int32 code.
            if len(out) == n0:
                o = tuple(x % sz for x, sz in zip(o, S))
        return replace(self, size=S, shift=o)

    def to_attn(self):
        if any(_as_tuple(self.shift)):
            return f"block(size = {_fmt_axis(self.size)}, shift = {_fmt_axis(self.shift)})"
        return f"block({_fmt_axis(self.size)})"


@dataclass(frozen=True)
class Strided(Expr):
    """``q_a % step_a == k_a % step_a`` on every axis (dilated / strided attention)."""

    step: PerAxis
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = None
        for a in range(env.layout.rank):
            here = q.coord[a] % self.step[a] == k.coord[a] % self.step[a]
            ok = here if ok is None else ok & here
        return ok

    def bind(self, layout, out):
        n0 = len(out)
        s = _per_axis(self, "step", self.step, layout, out)
        if len(out) == n0:
            for a, L in enumerate(layout.sizes):
                _check(1 <= s[a] <= L, out, self,
                       f"strided step {s[a]} on axis {layout.names[a]} is outside 1..{L} (the axis size)",
                       f"valid: 1 <= step <= {L}")
        return replace(self, step=s)

    def to_attn(self):
        return f"strided({_fmt_axis(self.step)})"


@dataclass(frozen=True)
class Grid(Expr):
    """MaxViT grid attention: ``strided(L_a / size_a)``; ``size_a`` must divide ``L_a``."""

    size: PerAxis
    span: Span | None = _span()

    def steps(self, layout: Layout) -> tuple[int, ...]:
        return tuple(L // G for L, G in zip(layout.sizes, self.size))

    def allowed(self, q, k, env):
        ok = None
        for a, st in enumerate(self.steps(env.layout)):
            here = q.coord[a] % st == k.coord[a] % st
            ok = here if ok is None else ok & here
        return ok

    def bind(self, layout, out):
        n0 = len(out)
        G = _per_axis(self, "size", self.size, layout, out)
        if len(out) == n0:
            for a, L in enumerate(layout.sizes):
                if not (1 <= G[a] <= L and L % G[a] == 0):  # the hint costs sqrt(L): only on error
                    _check(False, out, self,
                           f"grid size {G[a]} does not divide axis {layout.names[a]} of size {L}",
                           f"valid: a divisor of {L}, e.g. {', '.join(str(x) for x in _divisors(L)[:8])}")
        return replace(self, size=G)

    def to_attn(self):
        return f"grid({_fmt_axis(self.size)})"


def _divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, in O(sqrt n) steps."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


@dataclass(frozen=True)
class Axial(Expr):
    """Attend along one axis: every other axis equal."""

    axis: str
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ax = env.layout.index(self.axis)
        ok = np.ones(np.broadcast_shapes(q.flat.shape, k.flat.shape), dtype=bool)
        for a in range(env.layout.rank):
            if a != ax:
                ok = ok & (q.coord[a] == k.coord[a])
        return ok

    def bind(self, layout, out):
        if self.axis not in layout.names:
            out.append(Diagnostic(
                f"axial: unknown axis '{self.axis}'{did_you_mean(self.axis, layout.names)}",
                self.span, f"axes of this layout: {', '.join(layout.names)}"))
        return self

    def to_attn(self):
        return f"axial({self.axis})"


@dataclass(frozen=True)
class Halo(Expr):
    """HaloNet: a query's block of ``block`` tokens plus ``halo`` tokens around it, per axis."""

    block: PerAxis
    halo: PerAxis
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = None
        for a in range(env.layout.rank):
            B, h = self.block[a], self.halo[a]
            lo = (q.coord[a] // B) * B - h
            here = (k.coord[a] >= lo) & (k.coord[a] < lo + B + 2 * h)
            ok = here if ok is None else ok & here
        return ok

    def bind(self, layout, out):
        n0 = len(out)
        B = _per_axis(self, "block", self.block, layout, out)
        h = _per_axis(self, "halo", self.halo, layout, out)
        if len(out) == n0:
            for a, L in enumerate(layout.sizes):
                _check(1 <= B[a] <= L, out, self,
                       f"halo block {B[a]} on axis {layout.names[a]} is outside 1..{L} (the axis size)")
                _check(h[a] >= 0, out, self, f"halo {h[a]} on axis {layout.names[a]} must be >= 0")
            # A halo of L or more reaches both ends of the axis from any block: store it as L.
            h = tuple(min(x, L) for x, L in zip(h, layout.sizes))
        return replace(self, block=B, halo=h)

    def to_attn(self):
        return f"halo(block = {_fmt_axis(self.block)}, halo = {_fmt_axis(self.halo)})"


# --- runtime inputs -----------------------------------------------------------------------

@dataclass(frozen=True)
class Same(Expr):
    """``ids[q] == ids[k]`` for an ``input NAME: ids[N]`` supplied at call time (documents)."""

    input: str
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ids = np.asarray(env.inputs[self.input]).reshape(-1)
        return ids[q.flat] == ids[k.flat]

    def to_attn(self):
        return f"same({self.input})"


@dataclass(frozen=True)
class Valid(Expr):
    """``q < len and k < len`` for an ``input NAME: length`` supplied at call time (padding)."""

    input: str
    span: Span | None = _span()

    def allowed(self, q, k, env):
        n = int(np.asarray(env.inputs[self.input]).reshape(()))
        return (q.flat < n) & (k.flat < n)

    def to_attn(self):
        return f"valid({self.input})"


# --- content-dependent primitives (LANGUAGE.md §6) ----------------------------------------

SCOPES = ("query", "head")


def box_ids(coord: Sequence[np.ndarray], box: tuple[int, ...], sizes: tuple[int, ...]) -> np.ndarray:
    """Row-major number of the ``box``-shaped cell holding each coordinate (ragged end boxes)."""
    out = None
    for c, b, L in zip(coord, box, sizes):
        here = np.asarray(c) // b
        out = here if out is None else out * (-(-L // b)) + here
    return out


@dataclass(frozen=True)
class Route(Expr):
    """Routed key blocks chosen per query group from Q/K content (MoBA, VMoBA, BiFormer, PBS-Attn).

    ``allowed`` reads the selection the routing stage put in ``env.content`` (see
    :mod:`attnlang.routing`, which defines the selection itself); the node only maps tokens to
    query groups and key blocks.
    """

    block: PerAxis
    top: int | None = None
    threshold: float | None = None
    among: Expr = Full()
    query_block: PerAxis = 1
    scope: str = "query"
    permute: int | None = None  # PBS-Attn key permutation: importance(segment = permute)
    span: Span | None = _span()

    def groups(self, layout: Layout) -> int:
        return math.prod(-(-L // b) for L, b in zip(layout.sizes, self.query_block))

    def blocks(self, layout: Layout) -> int:
        return self.blocks_of(self.block, layout)

    @staticmethod
    def blocks_of(block: tuple[int, ...], layout: Layout) -> int:
        return math.prod(-(-L // b) for L, b in zip(layout.sizes, block))

    def group_of(self, p: Points, layout: Layout) -> np.ndarray:
        return box_ids(p.coord, self.query_block, layout.sizes)

    def block_of(self, p: Points, env: Env) -> np.ndarray:
        """Key block of each key: by coordinates, or by permuted position with permute_keys."""
        if self.permute is None:
            return box_ids(p.coord, self.block, env.layout.sizes)
        return _content(env, (self, "pos"))[env.head][p.flat] // self.block[0]

    def allowed(self, q, k, env):
        sel = _content(env, self)[env.head]
        return sel[self.group_of(q, env.layout), self.block_of(k, env)]

    def bind(self, layout, out):
        n0 = len(out)
        B = _per_axis(self, "block", self.block, layout, out)
        Bq = _per_axis(self, "query_block", self.query_block, layout, out)
        if len(out) == n0:
            check_boxes(self, "route", {"block": B, "query_block": Bq}, layout, out)
        if (self.top is None) == (self.threshold is None):
            out.append(Diagnostic(
                "route needs exactly one of top = k or threshold = tau"
                + (f", got top = {self.top} and threshold = {self.threshold}" if self.top is not None else ""),
                self.span, "e.g. route(block = 512, top = 3) or route(block = 512, threshold = 0.25)"))
        if self.top is not None:
            ok = isinstance(self.top, (int, np.integer)) and not isinstance(self.top, bool) and self.top >= 1
            _check(ok, out, self, f"route top = {self.top!r} must be an integer >= 1")
        if self.threshold is not None:
            ok = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool) \
                and 0 < self.threshold <= 1
            _check(ok, out, self, f"route threshold = {self.threshold!r} is outside (0, 1]",
                   "valid: 0 < threshold <= 1 (the softmax mass of the selected blocks)")
        _check(self.scope in SCOPES, out, self,
               f"route scope '{self.scope}'{did_you_mean(str(self.scope), SCOPES)} is not valid",
               "valid: scope = query (per query group) or scope = head (VMoBA global selection)")
        if self.permute is not None:
            _check(layout.rank == 1, out, self,
                   f"route permute_keys needs a 1-D layout, got tokens {layout.to_attn()}",
                   "flatten the tokens to one axis, or drop permute_keys")
            ok = isinstance(self.permute, (int, np.integer)) and not isinstance(self.permute, bool) \
                and self.permute >= 1  # a segment past N is a tail segment: keys stay in place
            _check(ok, out, self, f"route importance segment = {self.permute!r} must be an integer >= 1")
        among = self.among.bind(layout, out)
        dynamic = [n for n in among.walk() if isinstance(n, (Route, Same, Valid))]
        _check(not dynamic, out, self,
               f"route among = {among.to_attn()} must be static, but reads "
               f"{', '.join(sorted({_prim_name(n) for n in dynamic}))}",
               "among takes primitives of token coordinates (causal, window, block, ...); combine "
               "runtime inputs outside: same(doc) & route(...)")
        top, permute = self.top, self.permute
        if not out:
            # `top` past the block count selects every eligible block (and `top * groups` past
            # all pairs with scope = head); a segment past N permutes nothing: store the
            # smallest value with that meaning, so no count wider than the layout is multiplied.
            top = None if top is None else min(int(top), self.blocks_of(B, layout))
            permute = None if permute is None else min(int(permute), layout.n + 1)
        return replace(self, block=B, query_block=Bq, among=among, top=top, permute=permute,
                       threshold=None if self.threshold is None else float(self.threshold))

    def children(self):
        return (self.among,)

    def to_attn(self):
        args = [f"block = {_fmt_axis(self.block)}"]
        if self.top is not None:
            args.append(f"top = {self.top}")
        if self.threshold is not None:
            args.append(f"threshold = {self.threshold!r}")
        if not isinstance(self.among, Full):
            args.append(f"among = {self.among.to_attn()}")
        if _as_tuple(self.query_block) != (1,) * _len(self.query_block):
            args.append(f"query_block = {_fmt_axis(self.query_block)}")
        if self.scope != "query":
            args.append(f"scope = {self.scope}")
        if self.permute is not None:
            args.append(f"permute_keys = importance(segment = {self.permute})")
        return f"route({', '.join(args)})"


def _content(env: Env, key: Any) -> np.ndarray:
    try:
        return env.content[key]
    except KeyError:
        raise AttnError(
            "this pattern reads Q/K content (route): evaluate it through "
            "attnlang.compile(...)(q, k, v), or pass content=attnlang.routing.pattern_content(pattern, q, k)") from None


# --- combinators --------------------------------------------------------------------------

@dataclass(frozen=True)
class And(Expr):
    """Both (all) sub-patterns allow the pair (``a & b``, and ``a - b`` as ``a & ~b``)."""

    items: tuple[Expr, ...]
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = self.items[0].allowed(q, k, env)
        for it in self.items[1:]:
            ok = ok & it.allowed(q, k, env)
        return ok

    def bind(self, layout, out):
        return and_(*(it.bind(layout, out) for it in self.items), span=self.span)

    def children(self):
        return self.items

    def to_attn(self):
        parts = []
        for i, it in enumerate(self.items):
            if i > 0 and isinstance(it, Not):
                parts.append(" - " + _paren(it.item, Or, And))
            else:
                parts.append((" & " if i else "") + _paren(it, Or))
        return "".join(parts)


@dataclass(frozen=True)
class Or(Expr):
    """Either (any) sub-pattern allows the pair (``a | b``)."""

    items: tuple[Expr, ...]
    span: Span | None = _span()

    def allowed(self, q, k, env):
        ok = self.items[0].allowed(q, k, env)
        for it in self.items[1:]:
            ok = ok | it.allowed(q, k, env)
        return ok

    def bind(self, layout, out):
        return or_(*(it.bind(layout, out) for it in self.items), span=self.span)

    def children(self):
        return self.items

    def to_attn(self):
        return " | ".join(it.to_attn() for it in self.items)


@dataclass(frozen=True)
class Not(Expr):
    """The complement (``~a``)."""

    item: Expr
    span: Span | None = _span()

    def allowed(self, q, k, env):
        return ~self.item.allowed(q, k, env)

    def bind(self, layout, out):
        return not_(self.item.bind(layout, out), span=self.span)

    def children(self):
        return (self.item,)

    def to_attn(self):
        return "~" + _paren(self.item, Or, And)


def _paren(e: Expr, *kinds: type) -> str:
    s = e.to_attn()
    return f"({s})" if isinstance(e, kinds) else s


def and_(*items: Expr, span: Span | None = None) -> Expr:
    """Canonical conjunction: flattened, ``full`` dropped, ``none`` absorbing."""
    flat: list[Expr] = []
    for it in items:
        if isinstance(it, And):
            flat.extend(it.items)
        elif isinstance(it, Empty):
            return Empty(span=span)
        elif not isinstance(it, Full):
            flat.append(it)
    if not flat:
        return Full(span=span)
    return flat[0] if len(flat) == 1 else And(tuple(flat), span=span)


def or_(*items: Expr, span: Span | None = None) -> Expr:
    """Canonical disjunction: flattened, ``none`` dropped, ``full`` absorbing."""
    flat: list[Expr] = []
    for it in items:
        if isinstance(it, Or):
            flat.extend(it.items)
        elif isinstance(it, Full):
            return Full(span=span)
        elif not isinstance(it, Empty):
            flat.append(it)
    if not flat:
        return Empty(span=span)
    return flat[0] if len(flat) == 1 else Or(tuple(flat), span=span)


def not_(item: Expr, span: Span | None = None) -> Expr:
    """Canonical complement: ``~~a == a``, ``~full == none``, ``~none == full``."""
    if isinstance(item, Not):
        return item.item
    if isinstance(item, Full):
        return Empty(span=span)
    if isinstance(item, Empty):
        return Full(span=span)
    return Not(item, span=span)


# --------------------------------------------------------------------------------------------
# Heads, inputs, schedule, the bound pattern
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadRange:
    """One branch of ``by head``: heads ``lo..hi`` use ``expr``."""

    lo: int
    hi: int
    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class ByHead:
    """Different patterns for different query-head ranges; ranges cover ``0..heads`` once."""

    branches: tuple[HeadRange, ...]
    span: Span | None = _span()

    def to_attn(self, indent: str = "    ") -> str:
        lines = ["by head {"]
        for b in self.branches:
            lines.append(f"{indent}    {b.lo}..{b.hi}: {b.expr.to_attn()}")
        lines.append(indent + "}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Pyramid:
    """PSA pooled pyramid (LANGUAGE.md §6.2): a whole ``attend``, not an Expr (it says at what
    resolution keys are seen, not only which). Semantics and validation: :mod:`attnlang.pyramid`."""

    block: PerAxis
    keep: tuple[float, ...] | None = None  # fraction of eligible blocks per level; required
    query_block: PerAxis = 1
    levels: tuple[int, ...] = (1, 2, 4, 8)
    among: Expr = Full()
    span: Span | None = _span()

    def bind(self, layout: Layout, out: list[Diagnostic]) -> "Pyramid":
        return bind_pyramid(self, layout, out)

    def to_attn(self, indent: str = "") -> str:
        args = [f"block = {_fmt_axis(self.block)}"]
        if self.query_block not in (1, (1,) * _len(self.query_block)):
            args.append(f"query_block = {_fmt_axis(self.query_block)}")
        args.append("levels = [" + ", ".join(map(str, self.levels)) + "]")
        args.append("keep = [" + ", ".join(map(repr, self.keep or ())) + "]")
        if not isinstance(self.among, Full):
            args.append(f"among = {self.among.to_attn()}")
        return f"pyramid({', '.join(args)})"

    def __str__(self) -> str:
        return self.to_attn()


# Pyramid validation lives with the node, as Route's does (was attnlang.pyramid.bind_pyramid;
# moved so that the IR imports nothing above it).

def bind_pyramid(p: Pyramid, layout: Layout, out: list[Diagnostic]) -> Pyramid:
    """Normalise per-axis sizes and check every constraint of §6.2, appending to ``out``."""
    n0 = len(out)
    block = _per_axis(p, "block", p.block, layout, out)
    qblock = _per_axis(p, "query_block", p.query_block, layout, out)
    if len(out) == n0:
        check_boxes(p, "pyramid", {"block": block, "query_block": qblock}, layout, out)
    levels, keep = tuple(p.levels), tuple(p.keep or ())
    if not keep:
        out.append(Diagnostic("pyramid needs keep = [...]: the fraction of eligible blocks each level gets",
                              p.span, f"e.g. keep = [{', '.join(['0.1'] * max(1, len(levels)))}]"))
    bad_levels = [v for v in levels if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1)]
    if not levels or bad_levels:
        out.append(Diagnostic(f"pyramid levels {list(levels)} must be a non-empty list of positive integers",
                              p.span, "e.g. levels = [1, 2, 4, 8] (tokens pooled per key at each level)"))
    bad_keep = [v for v in keep if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)]
    if bad_keep:
        out.append(Diagnostic(f"pyramid keep {list(keep)} has entries outside 0..1: {bad_keep}", p.span,
                              "each keep entry is a fraction of the eligible blocks, 0 <= f <= 1"))
    if keep and levels and len(keep) != len(levels):
        out.append(Diagnostic(f"pyramid has {len(levels)} levels {list(levels)} but {len(keep)} keep "
                              f"fractions {list(keep)}", p.span, "give one keep fraction per level"))
    if keep and not bad_keep and sum(map(exact_fraction, keep)) > 1:
        total = sum(Decimal(repr(float(x))) for x in keep)
        out.append(Diagnostic(f"pyramid keep {list(keep)} sums to {total}, more than 1", p.span,
                              "valid: sum(keep) <= 1 as the decimals are written (the rest of the "
                              "blocks are skipped)"))
    if len(out) == n0:
        sizes = block_sizes(layout, block)
        for lv in levels:
            bad = [s for s in sizes if s % lv]
            _check(not bad, out, p,
                   f"pyramid level {lv} does not divide the block token count {bad[0] if bad else ''}"
                   f" (blocks {_fmt_box(block)} on tokens {layout.to_attn()} hold {sorted(sizes)} tokens)",
                   "every level must divide the token count of every block, including the smaller "
                   "boxes at the end of an axis; pick a block shape that divides the axes")
    among = p.among
    if not isinstance(among, Expr):
        out.append(Diagnostic(f"pyramid among must be a pattern expression, got {among!r}", p.span))
    else:
        among = among.bind(layout, out)
    return Pyramid(block, tuple(float(x) for x in keep) if not bad_keep else keep, qblock,
                   tuple(int(x) for x in levels) if not bad_levels else levels, among, p.span)


def _fmt_box(box: tuple[int, ...]) -> str:
    return str(box[0]) if len(box) == 1 else "(" + ", ".join(map(str, box)) + ")"


def exact_fraction(x: float) -> Fraction:
    """A keep fraction as the decimal the user wrote (0.1 is 1/10, not the nearest double)."""
    return Fraction(repr(float(x)))


def block_sizes(layout: Layout, box: tuple[int, ...]) -> set[int]:
    """The distinct token counts of the boxes that tile the layout (full boxes and axis tails)."""
    per_axis = [{b} | ({L % b} if L % b else set()) for L, b in zip(layout.sizes, box)]
    return {math.prod(c) for c in itertools.product(*per_axis)}


def _no_mask(pattern: "Pattern") -> AttnError:
    return AttnError(
        f"pattern '{pattern.name}' is a pyramid(...): it reads Q/K and pools keys, so it has no "
        "boolean mask or static tile plan",
        hint="run it through attnlang.compile(...)(q, k, v) (torch or reference backend); "
             "attnlang.pyramid.level_table gives the levels it picks")


@dataclass(frozen=True)
class Input:
    """A runtime input: ``input doc: ids[N]`` (int ids per token) or ``input len: length``."""

    name: str
    kind: str  # "ids" | "length"
    span: Span | None = _span()

    def to_attn(self, n: int) -> str:
        return f"input {self.name}: ids[{n}]" if self.kind == "ids" else f"input {self.name}: length"


ORDERS = ("natural", "tiled", "morton", "hilbert", "rcm")


@dataclass(frozen=True)
class Schedule:
    """How to run (never what): tile boxes and the token order; ``None`` = planner's choice."""

    tile_q: tuple[int, ...] | None = None
    tile_kv: tuple[int, ...] | None = None
    order: str | None = None
    span: Span | None = _span()

    def to_attn(self) -> list[str]:
        lines = []
        if self.tile_q is not None or self.tile_kv is not None:
            args = []
            if self.tile_q is not None:
                args.append(f"q = {_fmt_tile(self.tile_q)}")
            if self.tile_kv is not None:
                args.append(f"kv = {_fmt_tile(self.tile_kv)}")
            lines.append(f"schedule tile({', '.join(args)})")
        if self.order is not None:
            lines.append(f"schedule order({self.order})")
        return lines


def _fmt_tile(t: tuple[int, ...]) -> str:
    return str(t[0]) if len(t) == 1 else "(" + ", ".join(map(str, t)) + ")"


@dataclass(frozen=True)
class Pattern:
    """A bound attention pattern: layout, expression(s), heads, runtime inputs and schedule.

    Build one from Python with :meth:`create` (which validates), or get one from a ``.attn``
    file through :func:`attnlang.parse` / :func:`attnlang.compile`.

    >>> from attnlang import neighborhood, causal
    >>> p = Pattern.create(neighborhood(window=(3, 7, 7)) & causal("t"), tokens=(4, 16, 16))
    >>> p.n
    1024
    """

    layout: Layout
    attend: Expr | ByHead | Pyramid
    name: str = "pattern"
    heads: int | None = None
    inputs: tuple[Input, ...] = ()
    schedule: Schedule = Schedule()
    params: tuple[tuple[str, Any], ...] = ()  # resolved parameter values, for printing/caching
    span: Span | None = _span()

    # -- boundary -------------------------------------------------------------------------
    @staticmethod
    def create(attend: Expr | ByHead | Mapping[tuple[int, int], Expr], tokens: Any, *,
               name: str = "pattern", heads: int | None = None,
               inputs: Mapping[str, str] | Sequence[Input] = (),
               tile_q: Any = None, tile_kv: Any = None, order: str | None = None,
               params: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
               span: Span | None = None) -> "Pattern":
        """Bind ``attend`` to a layout and validate everything; raise :class:`AttnError` listing
        every problem. ``attend`` may be a dict ``{(0, 6): expr, (6, 8): expr}`` for per-head
        patterns, ``inputs`` a dict ``{"doc": "ids", "len": "length"}``.
        """
        out: list[Diagnostic] = []
        layout = Layout.of(tokens)
        if isinstance(inputs, Mapping):
            inputs = tuple(Input(n, kind) for n, kind in inputs.items())
        inputs = tuple(inputs)
        for inp in inputs:
            if inp.kind not in ("ids", "length"):
                out.append(Diagnostic(f"input '{inp.name}' has kind '{inp.kind}'", inp.span,
                                      "valid kinds: ids, length"))
        if isinstance(attend, Mapping):
            attend = ByHead(tuple(HeadRange(lo, hi, e) for (lo, hi), e in attend.items()))
        if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
            out.append(Diagnostic(f"heads {heads!r} must be a positive integer"))
            heads = None
        if isinstance(attend, ByHead):
            attend, heads = _bind_by_head(attend, heads, layout, out)
        elif isinstance(attend, (Expr, Pyramid)):
            attend = attend.bind(layout, out)
        else:
            raise AttnError(f"attend must be a pattern expression, got {type(attend).__name__}")
        exprs = [b.expr for b in attend.branches] if isinstance(attend, ByHead) else [attend]
        exprs = [attend.among] if isinstance(attend, Pyramid) else exprs
        declared = {i.name: i for i in inputs}
        for e in exprs:
            for node in e.walk():
                if isinstance(node, (Same, Valid)):
                    want = "ids" if isinstance(node, Same) else "length"
                    inp = declared.get(node.input)
                    fn = _prim_name(node)
                    if inp is None:
                        out.append(Diagnostic(
                            f"{fn}({node.input}): no input named '{node.input}' is declared"
                            f"{did_you_mean(node.input, declared)}", node.span,
                            f"declare it: input {node.input}: " + ("ids[N]" if want == "ids" else "length")
                            if node.span is not None else  # built in Python: no `input` lines there
                            f"pass inputs={{'{node.input}': '{want}'}} to Pattern.create"))
                    elif inp.kind != want:
                        out.append(Diagnostic(
                            f"{fn}({node.input}) needs an input of kind {want}, but '{node.input}' "
                            f"is declared as {inp.kind}", node.span))
        schedule = Schedule(_tile(tile_q, layout, "q", out, span), _tile(tile_kv, layout, "kv", out, span),
                            order, span)
        if order is not None and order not in ORDERS:
            out.append(Diagnostic(f"unknown order '{order}'{did_you_mean(str(order), ORDERS)}", span,
                                  f"valid orders: {', '.join(ORDERS)}"))
        if out:
            raise AttnError(out)
        params = tuple(params.items()) if isinstance(params, Mapping) else tuple(params)
        return Pattern(layout, attend, name, heads, inputs, schedule, params, span)

    # -- queries --------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.layout.n

    def exprs(self) -> tuple[tuple[int, int | None, Expr], ...]:
        """``(head_lo, head_hi, expr)`` per distinct branch; ``hi=None`` means all heads."""
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        if isinstance(self.attend, ByHead):
            return tuple((b.lo, b.hi, b.expr) for b in self.attend.branches)
        return ((0, self.heads, self.attend),)

    def expr_for_head(self, head: int) -> Expr:
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        if isinstance(self.attend, ByHead):
            for b in self.attend.branches:
                if b.lo <= head < b.hi:
                    return b.expr
            raise AttnError(f"head {head} is outside 0..{self.heads}")
        return self.attend

    @property
    def reads_content(self) -> bool:
        """Whether the pattern reads Q/K themselves (LANGUAGE.md §6): planned per call."""
        if isinstance(self.attend, Pyramid):
            return True
        return any(isinstance(n, Route) for _, _, e in self.exprs() for n in e.walk())

    def mask(self, heads: int | None = None, inputs: Mapping[str, Any] | None = None,
             content: Mapping[Any, np.ndarray] | None = None) -> np.ndarray:
        """Dense boolean mask ``[heads, N, N]`` (``heads`` defaults to the pattern's, else 1).

        ``inputs`` are one batch item's runtime inputs (numpy-convertible); ``content`` is one
        batch item's routing decisions (:func:`attnlang.routing.route_content`) for patterns
        with ``route``. This is the literal semantics, O(N²): use it on small sizes only.
        """
        if isinstance(self.attend, Pyramid):
            raise _no_mask(self)
        h = heads if heads is not None else (self.heads or 1)
        env_inputs = {k: np.asarray(v) for k, v in (inputs or {}).items()}
        missing = [i.name for i in self.inputs if i.name not in env_inputs]
        if missing:
            raise AttnError(f"pattern '{self.name}' needs runtime input(s) {missing}")
        idx = np.arange(self.n)
        q = self.layout.points(idx[:, None])
        k = self.layout.points(idx[None, :])
        out = np.empty((h, self.n, self.n), dtype=bool)
        cache: dict[int, np.ndarray] = {}
        for head in range(h):
            e = self.expr_for_head(head) if isinstance(self.attend, ByHead) else self.attend
            key = (id(e), head if content else None)  # routed selections differ per head
            if key not in cache:
                cache[key] = np.broadcast_to(
                    e.allowed(q, k, Env(self.layout, env_inputs, head, content or {})), (self.n, self.n))
            out[head] = cache[key]
        return out

    def to_attn(self) -> str:
        """Canonical ``.attn`` text; parsing it gives back an equal Pattern."""
        lines = [f"pattern {self.name} {{", f"    tokens {self.layout.to_attn()}"]
        if self.heads is not None:
            lines.append(f"    heads {self.heads}")
        for inp in self.inputs:
            lines.append("    " + inp.to_attn(self.n))
        body = self.attend.to_attn() if isinstance(self.attend, Expr) else self.attend.to_attn("    ")
        lines.append(f"    attend {body}")
        lines += ["    " + s for s in self.schedule.to_attn()]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_attn()


def _tile(value: Any, layout: Layout, which: str, out: list[Diagnostic], span: Span | None):
    if value is None:
        return None
    vals = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in vals):
        out.append(Diagnostic(f"schedule tile {which} = {value!r} must be positive integers", span,
                              "valid: an integer (1-D) or one integer per axis"))
        return None
    if len(vals) not in (1, layout.rank):
        out.append(Diagnostic(f"schedule tile {which} = {value!r} has {len(vals)} entries but the "
                              f"layout has {layout.rank} axes", span))
        return None
    return tuple(int(v) for v in vals)


def _bind_by_head(attend: ByHead, heads: int | None, layout: Layout, out: list[Diagnostic]):
    branches = sorted(attend.branches, key=lambda b: (b.lo, b.hi))
    if heads is None:
        out.append(Diagnostic("`by head` needs a `heads n` line", attend.span,
                              "add e.g. `heads 8` after the tokens line"))
        heads = max((b.hi for b in branches), default=0)
    covered = 0
    for b in branches:
        if b.lo >= b.hi:
            out.append(Diagnostic(f"head range {b.lo}..{b.hi} is empty", b.span, "write lo..hi with lo < hi"))
        elif b.lo < covered:
            out.append(Diagnostic(f"head range {b.lo}..{b.hi} overlaps heads {b.lo}..{min(covered, b.hi)}",
                                  b.span, f"ranges must cover 0..{heads} exactly once"))
        elif b.lo > covered:
            out.append(Diagnostic(f"heads {covered}..{b.lo} are not covered by any branch", b.span,
                                  f"ranges must cover 0..{heads} exactly once"))
        covered = max(covered, b.hi)
    if covered != heads and heads:
        # point at the range to change, not at `attend by head {`
        past = [b for b in branches if b.hi > heads]
        where = (past[0] if past else branches[-1]).span if branches else None
        message = (f"head range {past[0].lo}..{past[0].hi} goes past the pattern's {heads} heads" if past
                   else f"heads {covered}..{heads} are not covered by any branch")
        out.append(Diagnostic(message, where or attend.span, f"ranges must cover 0..{heads} exactly once"))
    # Canonical head order: every consumer may rely on branches sorted by their first head (the
    # Triton head switch tests `h < hi` in turn; a file may list the ranges in any order).
    bound = tuple(replace(b, expr=b.expr.bind(layout, out)) for b in branches)
    return ByHead(bound, attend.span), heads


# --------------------------------------------------------------------------------------------
# Python builders (LANGUAGE.md §3); `global_` because `global` is a Python keyword
# --------------------------------------------------------------------------------------------

full = Full()
none = Empty()
causal = Causal()


def _window_side(call: str, v: Any) -> Any:
    """A window side as the user passed it to ``call``: refused now, in the user's own words
    (``sliding r``, not the ``window before`` it becomes), unless a non-negative integer or inf."""
    if v == INF or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0):
        return v
    what = ("is a string; write the number without quotes" if isinstance(v, str) else
            "is negative" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and v < 0
            else f"is a {type(v).__name__}")
    raise AttnError(f"{call} = {v!r} {what}",
                    hint="valid: a non-negative integer number of tokens, or math.inf (unbounded)")


def window(before: int | float = INF, after: int | float = INF) -> Expr:
    """``window(before=b, after=f)``: keys with ``-b <= k - q <= f`` (flat order)."""
    return Window(_window_side("window before", before), _window_side("window after", after))


def sliding(r: int) -> Expr:
    """``sliding(r) == window(before=r, after=r)``; ``causal & sliding(r)`` sees ``r + 1`` keys."""
    return Window(_window_side("sliding r", r), _window_side("sliding r", r))


def neighborhood(window: PerAxis, dilation: PerAxis = 1, stride: PerAxis = 1,
                 causal: PerAxis = False) -> Expr:
    """NATTEN neighborhood attention, e.g. ``neighborhood(window=(3, 7, 7), dilation=(1, 2, 2))``."""
    return Neighborhood(window, dilation, stride, causal)


def block(size: PerAxis, shift: PerAxis = 0) -> Expr:
    """Block partition; Swin's shifted windows are ``block(size, shift=size // 2)``."""
    return Block(size, shift)


def strided(step: PerAxis) -> Expr:
    """``q_a % step_a == k_a % step_a`` on every axis."""
    return Strided(step)


def grid(size: PerAxis) -> Expr:
    """MaxViT grid attention over a ``size`` grid (must divide every axis)."""
    return Grid(size)


def axial(axis: str) -> Expr:
    """Attend along ``axis`` only."""
    return Axial(axis)


def halo(block: PerAxis, halo: PerAxis) -> Expr:
    """HaloNet blocked local attention with a halo."""
    return Halo(block, halo)


def _selection(a: Any, b: Any = None) -> Selection:
    if b is not None:
        return Range(int(a), int(b))
    if isinstance(a, range):
        if a.step != 1:
            return Indices(tuple(a))
        return Range(a.start, a.stop)
    if isinstance(a, (list, tuple, np.ndarray)):
        return Indices(tuple(int(x) for x in a))
    raise AttnError(f"expected a range, a list of indices or (lo, hi), got {a!r}")


def keys(sel: Any, hi: int | None = None) -> Expr:
    """Keys in ``range(lo, hi)`` / a list: ``keys(range(0, 4))``, ``keys(0, 4)``, ``keys([0, 9])``."""
    return Keys(_selection(sel, hi))


def queries(sel: Any, hi: int | None = None) -> Expr:
    """Queries in a range or list (see :func:`keys`)."""
    return Queries(_selection(sel, hi))


def global_(sel: Any, hi: int | None = None) -> Expr:
    """Longformer global tokens: ``queries(sel) | keys(sel)``."""
    s = _selection(sel, hi)
    return or_(Queries(s), Keys(s))


def sink(n: int) -> Expr:
    """Attention sinks: ``keys(0..n)``."""
    return Keys(Range(0, n))


def random(block: int, count: int, seed: int = 0) -> Expr:
    """BigBird random blocks (deterministic for a seed, on every machine)."""
    return Random(block, count, seed)


def same(input: str) -> Expr:
    """``ids[q] == ids[k]`` for a runtime ids input (packed documents)."""
    return Same(input)


def valid(input: str) -> Expr:
    """``q < len and k < len`` for a runtime length input (padding)."""
    return Valid(input)


def pyramid(block: PerAxis, query_block: PerAxis = 1, levels: Sequence[int] = (1, 2, 4, 8),
            keep: Sequence[float] = (), among: Expr = full) -> Pyramid:
    """PSA pooled pyramid, a whole attend: ``Pattern.create(pyramid(64, 64, keep=[.1, .1, .2, .2],
    among=causal), tokens=4096)`` (LANGUAGE.md §6.2)."""
    return Pyramid(block, tuple(keep), query_block, tuple(levels), among)


def route(block: PerAxis, top: int | None = None, threshold: float | None = None, among: Expr = full,
          query_block: PerAxis = 1, scope: str = "query", permute_keys: int | None = None) -> Expr:
    """Routed key blocks (LANGUAGE.md §6.1), e.g. MoBA:
    ``causal & (block(512) | route(512, top=3, among=causal))``; ``permute_keys=S`` is
    PBS-Attn's ``importance(segment = S)``."""
    return Route(block, top, threshold, among, query_block, scope, permute_keys)


_PRIM_NAMES: dict[type, str] = {
    Full: "full", Empty: "none", Causal: "causal", Window: "window", Neighborhood: "neighborhood",
    Block: "block", Strided: "strided", Grid: "grid", Axial: "axial", Halo: "halo", Keys: "keys",
    Queries: "queries", Random: "random", Same: "same", Valid: "valid", Route: "route",
}

PRIMITIVES: tuple[type, ...] = tuple(_PRIM_NAMES)

__all__ = [
    "INF", "Axis", "Layout", "Points", "Env", "Expr", "Full", "Empty", "Causal", "Window", "Range",
    "Indices", "Keys", "Queries", "Random", "Neighborhood", "Block", "Strided", "Grid", "Axial",
    "Halo", "Same", "Valid", "And", "Or", "Not", "HeadRange", "ByHead", "Input", "Schedule",
    "Pattern", "ORDERS", "and_", "or_", "not_", "natten_window", "random_blocks", "full", "none",
    "causal", "window", "sliding", "neighborhood", "block", "strided", "grid", "axial", "halo",
    "keys", "queries", "global_", "sink", "random", "same", "valid", "PRIMITIVES",
    "Pyramid", "pyramid",
    "Route", "route", "box_ids", "SCOPES",
]
