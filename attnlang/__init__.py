"""attnlang: a compiler for attention sparsity patterns."""
from attnlang.errors import AttnError
from attnlang.pattern import (
    Pattern, Layout, axial, block, causal, full, global_, grid, halo, keys, neighborhood, none,
    queries, random, same, sink, sliding, strided, valid, window,
)

__version__ = "0.1.0"
