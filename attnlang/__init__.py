"""attnlang: a compiler for attention sparsity patterns.

>>> import attnlang
>>> from attnlang import causal, sliding
>>> fn = attnlang.compile(causal & sliding(256), tokens=4096)     # doctest: +SKIP
>>> out = fn(q, k, v)                                              # doctest: +SKIP

``import attnlang`` stays light: torch and triton load only when a pattern runs.
"""
from attnlang.api import Compiled, compile, make_plan, mask, parse, resolve, simulate, to_block_mask
from attnlang.errors import AttnError
from attnlang.pattern import (
    Layout, Pattern, axial, block, causal, full, global_, grid, halo, keys, neighborhood, none,
    queries, random, same, sink, sliding, strided, valid, window,
)
from attnlang.pattern import route
from attnlang.version import __version__

__all__ = [
    "AttnError", "Compiled", "Layout", "Pattern", "axial", "block", "causal", "compile", "full",
    "global_", "grid", "halo", "keys", "make_plan", "mask", "neighborhood", "none", "parse",
    "queries", "random", "resolve", "same", "simulate", "sink", "sliding", "strided", "to_block_mask", "valid", "route",
    "window",
]
