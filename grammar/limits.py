"""Documented limits of the language (docs/language.md §11.1); each is a located AttnError.

They keep every input, however adversarial, to a bounded amount of work and a bounded Python
stack: ``attnlang check`` either succeeds or reports ``file:line:col``, never a RecursionError,
a ValueError from ``int()`` or a multi-minute big-integer computation.
"""
from __future__ import annotations

MAX_INT = 2 ** 62
"""Largest magnitude of an integer value: literals, arithmetic results and parameters. Sizes,
windows and indices beyond it mean nothing on a real machine (write ``inf`` for an unbounded
window); int64 index arithmetic in every backend stays clear of wrap-around."""

MAX_INT_DIGITS = 25
"""An integer literal longer than this (leading zeros aside) is refused before ``int()``."""

MAX_NESTING = 100
"""Deepest nesting of one expression. Every call argument, tuple or list item, index, ``~``/``-``
operand, range bound and right-hand operand of a binary operator is one level deeper; a chain of
left-associative operators (``a & b & c ...``, ``1 + 2 + 3 ...``) is one level however long, and
redundant parentheses count nothing."""

MAX_EVAL_DEPTH = 150
"""Deepest evaluation: expression levels plus macro expansions, counted together (a macro that
calls a macro that calls ... costs one level per call). Constants that refer to constants cost
nothing: their dependencies are evaluated first, in a loop."""
