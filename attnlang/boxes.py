"""Boxes of tokens as ids: route's query groups and key blocks, pyramid's groups and blocks.

A box shape tiles the layout row-major; boxes at the end of an axis are smaller. One function
numbers boxes from coordinates (:func:`attnlang.pattern.box_ids`, what ``Route.allowed``
evaluates); this module applies it to every token of a layout, for the planner, the routing
and pyramid oracles and the runtime alike.

>>> from attnlang.pattern import Layout
>>> ids, count = token_boxes(Layout.of(10), (4,))
>>> ids.tolist(), count
([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], 3)
"""
from __future__ import annotations

import math

import numpy as np

from attnlang.pattern import Layout, Route, box_ids


def token_boxes(layout: Layout, box: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """``(ids [N] int64, count)``: the row-major box number of every token, and how many boxes."""
    ids = box_ids(layout.coords(np.arange(layout.n)), box, layout.sizes).astype(np.int64)
    return ids, math.prod(-(-L // b) for L, b in zip(layout.sizes, box))


def box_order(ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order [N], starts [count + 1])``: tokens sorted by box, row-major inside each box
    (a stable sort keeps flat order, which is row-major order within a box)."""
    order = np.argsort(ids, kind="stable")
    starts = np.zeros(count + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(ids, minlength=count))
    return order, starts


def group_ids(route: Route, layout: Layout) -> np.ndarray:
    """Query group of every token under ``route``, int64 [N]."""
    return token_boxes(layout, route.query_block)[0]


def block_ids(route: Route, layout: Layout) -> np.ndarray:
    """Key block of every token in original order (no permutation), int64 [N]."""
    return token_boxes(layout, route.block)[0]


__all__ = ["token_boxes", "box_order", "group_ids", "block_ids"]
