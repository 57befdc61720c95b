"""The random-block generator ``random(block, count, seed)`` draws from: part of the spec."""
from __future__ import annotations


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def random_blocks(seed: int, query_block: int, n_blocks: int, count: int) -> tuple[int, ...]:
    """The key blocks ``random(block, count, seed)`` gives one query block: part of the spec.

    Floyd's sampling of ``count`` distinct blocks from ``n_blocks``, driven by a SplitMix64
    stream seeded with ``(seed, query_block)`` — plain integer arithmetic, so every machine and
    every backend draws the same blocks.
    """
    state = _splitmix64((seed & 0xFFFFFFFF) << 32 | (query_block & 0xFFFFFFFF))
    chosen: set[int] = set()
    for j in range(n_blocks - min(count, n_blocks), n_blocks):
        state = _splitmix64(state)
        t = state % (j + 1)
        chosen.add(j if t in chosen else t)
    return tuple(sorted(chosen))
