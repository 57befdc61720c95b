"""Helpers every node's ``bind`` and ``to_attn`` share: per-axis arguments, checks, formatting."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from attnlang.errors import Diagnostic
from attnlang.ir.expr import INF, Expr
from attnlang.ir.layout import Layout


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


def _prim_name(node: Any) -> str:
    """The language's name of a node (``Empty`` is ``none``) for messages."""
    return getattr(type(node), "keyword", type(node).__name__.lower())


def _check(cond: bool, out: list[Diagnostic], node: Expr, message: str, hint: str | None = None) -> None:
    if not cond:
        out.append(Diagnostic(message, node.span, hint))


def clamp_extent(v: int | float, n: int) -> int | float:
    """A distance of ``n`` or more on an axis of ``n`` tokens reaches every token: it means
    ``inf``, and binding stores it as ``inf`` so no backend ever sees an integer wider than the
    axis (``sliding(2**63)`` on 16 tokens is ``sliding(inf)``, never a wrapped int64)."""
    return INF if v == INF or v >= n else int(v)


def _len(v: Any) -> int:
    return len(v) if isinstance(v, tuple) else 1


def _as_tuple(v: Any) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, in O(sqrt n) steps."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]
