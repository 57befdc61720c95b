"""Front end: .attn text -> AST with spans -> Pattern IR, with every diagnostic.

>>> from attnlang.grammar import load
>>> m = load("pattern p { tokens n[8]\\n attend causal & sliding(2) }")
>>> int(m.instantiate().mask()[0].sum())
21

* :func:`load` parses and name-checks a file into a :class:`Module`;
* :meth:`Module.instantiate` evaluates a pattern to the Pattern IR;
* :func:`load_prelude` is the standard prelude ``std.attn``;
* :func:`parse_value` evaluates one value written in .attn syntax (``--set K=V``);
* :func:`read_source` reads a path or a string as source text.

``attnlang.parse`` (in ``attnlang/api.py``) reads files with :func:`read_source` and calls
:func:`load`.
"""
from __future__ import annotations

from attnlang.grammar.module import Module, load, load_prelude, parse_value
from attnlang.grammar.source import read_source

__all__ = ["Module", "load", "load_prelude", "parse_value", "read_source"]

