"""The static primitives (docs/language.md §4): flat-order, per-axis, and runtime-input predicates."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from attnlang.errors import Diagnostic, Span, did_you_mean
from attnlang.ir.bind import (
    _as_tuple, _check, _divisors, _fmt_axis, _fmt_scalar, _len, _per_axis, _prim_name, clamp_extent,
)
from attnlang.ir.expr import INF, Expr, PerAxis, _span
from attnlang.ir.layout import Layout
from attnlang.ir.natten import natten_window
from attnlang.ir.rng import random_blocks


# --- flat-order primitives ----------------------------------------------------------------

@dataclass(frozen=True)
class Causal(Expr):
    """``k <= q`` in flat order, or ``k_a <= q_a`` on one axis when ``axis`` is given."""

    keyword = "causal"  # the name in the language

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

    keyword = "window"  # the name in the language

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

    keyword = "keys"  # the name in the language

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

    keyword = "queries"  # the name in the language

    sel: Selection
    span: Span | None = _span()

    def allowed(self, q, k, env):
        return np.broadcast_to(self.sel.contains(q.flat), np.broadcast_shapes(q.flat.shape, k.flat.shape))

    def bind(self, layout, out):
        return replace(self, sel=_check_selection(self, self.sel, layout, out))

    def to_attn(self):
        return f"queries({self.sel.to_attn()})"


@dataclass(frozen=True)
class Random(Expr):
    """BigBird random blocks: each query block of ``block`` flat tokens sees ``count`` key blocks."""

    keyword = "random"  # the name in the language

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


@dataclass(frozen=True)
class Neighborhood(Expr):
    """NATTEN / GNA neighborhood attention per axis: window, dilation, stride, causal."""

    keyword = "neighborhood"  # the name in the language

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


@dataclass(frozen=True)
class Block(Expr):
    """Block partition: ``floor((x - shift) / size)`` equal on every axis (Swin with a shift)."""

    keyword = "block"  # the name in the language

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

    keyword = "strided"  # the name in the language

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

    keyword = "grid"  # the name in the language

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


@dataclass(frozen=True)
class Axial(Expr):
    """Attend along one axis: every other axis equal."""

    keyword = "axial"  # the name in the language

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

    keyword = "halo"  # the name in the language

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

    keyword = "same"  # the name in the language

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

    keyword = "valid"  # the name in the language

    input: str
    span: Span | None = _span()

    def allowed(self, q, k, env):
        n = int(np.asarray(env.inputs[self.input]).reshape(()))
        return (q.flat < n) & (k.flat < n)

    def to_attn(self):
        return f"valid({self.input})"
