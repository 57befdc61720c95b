"""NATTEN / GNA neighborhood arithmetic on one axis: the one definition every backend runs."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def natten_window(i: Any, L: int, K: int, d: int, s: int, causal: bool,
                  minimum: Callable = np.minimum, maximum: Callable = np.maximum):
    """NATTEN/GNA window of query coordinate(s) ``i`` on one axis (docs/language.md §4.1).

    Returns ``(group, start, end)``: the dilation group and the half-open range of in-group
    key coordinates the query sees. ``minimum``/``maximum`` (array, array-or-int) let another
    array library run this one definition (the flex backend passes torch's).
    """
    if minimum is np.minimum:
        i = np.asarray(i)
    g = i % d
    ip = i // d
    lg = (L - g + d - 1) // d
    if causal:
        leader = minimum((ip // s) * s + s - 1, lg - 1)
        start = maximum(leader - (K - 1), 0)
        end = minimum(ip + 1, lg)
    else:
        leader = minimum((ip // s) * s + s // 2, lg - 1)
        start = minimum(maximum(leader - K // 2, 0), lg - K)  # np.clip(x, 0, lg - K)
        end = start + K
    return g, start, end
