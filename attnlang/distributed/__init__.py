"""Context parallelism on ``torch.distributed``: plan-aware sharding, balanced work, sparse
communication.

``shard`` / ``Sharding`` / ``TileCost`` are pure numpy (the simulator and the benchmarks use them
without processes); ``ContextParallel`` loads torch on first use.

>>> import attnlang.distributed as dist_
>>> from attnlang import make_plan, causal, sliding
>>> dist_.shard(make_plan(causal & sliding(512), tokens=8192), 4).segments_per_rank
1

See docs/distributed.md.
"""
from attnlang.distributed.shard import Sharding, TileCost, shard, tile_rows

__all__ = ["ContextParallel", "Sharding", "TileCost", "shard", "tile_rows"]


def __getattr__(name):
    if name == "ContextParallel":  # torch loads here, never on `import attnlang.distributed`
        from attnlang.distributed.parallel import ContextParallel  # function-level: torch

        return ContextParallel
    raise AttributeError(f"module 'attnlang.distributed' has no attribute {name!r}")
