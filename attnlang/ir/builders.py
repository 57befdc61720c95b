"""Python builders of pattern expressions (docs/language.md §4); ``global_`` because ``global`` is a
Python keyword."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from attnlang.errors import AttnError
from attnlang.ir.expr import INF, Empty, Expr, Full, PerAxis, or_
from attnlang.ir.pattern import Pyramid
from attnlang.ir.primitives import (
    Axial, Block, Causal, Grid, Halo, Indices, Keys, Neighborhood, Queries, Random, Range, Same,
    Selection, Strided, Valid, Window,
)
from attnlang.ir.route import Route


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
    among=causal), tokens=4096)`` (docs/language.md §13.2)."""
    return Pyramid(block, tuple(keep), query_block, tuple(levels), among)


def route(block: PerAxis, top: int | None = None, threshold: float | None = None, among: Expr = full,
          query_block: PerAxis = 1, scope: str = "query", permute_keys: int | None = None) -> Expr:
    """Routed key blocks (docs/language.md §13.1), e.g. MoBA:
    ``causal & (block(512) | route(512, top=3, among=causal))``; ``permute_keys=S`` is
    PBS-Attn's ``importance(segment = S)``."""
    return Route(block, top, threshold, among, query_block, scope, permute_keys)
