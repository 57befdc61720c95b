"""Routed key blocks (docs/language.md §13.1): the ``route`` node and its box geometry."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from attnlang.errors import AttnError, Diagnostic, Span, did_you_mean
from attnlang.ir.bind import _as_tuple, _check, _fmt_axis, _len, _per_axis, _prim_name, check_boxes
from attnlang.ir.expr import Expr, Full, PerAxis, _span
from attnlang.ir.layout import Env, Layout, Points
from attnlang.ir.primitives import Same, Valid


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

    keyword = "route"  # the name in the language

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
