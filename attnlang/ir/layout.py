"""The token layout: named axes, flat row-major indices, and what a predicate may read (Env)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from attnlang.errors import AttnError, Span


DEFAULT_AXIS_NAMES = {1: ("n",), 2: ("h", "w"), 3: ("t", "h", "w")}


@dataclass(frozen=True)
class Axis:
    """One named axis of the token grid (``t[16]``)."""

    name: str
    size: int
    span: Span | None = field(default=None, compare=False, repr=False)


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
    # Content decisions computed once per call from Q/K (docs/language.md §13): for a Route ``r``,
    # ``content[r]`` is bool [Hq, query groups, key blocks]; with permute_keys also
    # ``content[(r, "perm")]`` (permuted position -> key) and ``content[(r, "pos")]`` (its
    # inverse), int [Hq, N]. See attnlang.routing.
    content: Mapping[Any, np.ndarray] = field(default_factory=dict)
