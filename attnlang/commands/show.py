"""``attnlang show FILE``: draw a pattern's mask as text, or as a PNG per head group.

    $ attnlang show examples/swa.attn --set N=32 --set W=2
    swa: N = 32, tokens n[32]; '#' allowed, '.' not (row = query, column = key)
      #...............................
      ##..............................
      .##.............................
      ...

Small patterns print exactly, one character per (query, key) pair. Larger ones are drawn
downsampled: a character stands for a square block of pairs, ``#`` when every pair in it is
allowed, ``+`` when some are, ``.`` when none. Up to :data:`DENSE_LIMIT` tokens the blocks are
classified from the IR's predicate row by row; beyond, from a natural-order tile plan, which
never evaluates the N x N mask.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping

import numpy as np

from attnlang.commands import (
    add_input_arguments, add_spec_arguments, resolve_pattern, sample_content, spec_inputs,
)
from attnlang.errors import AttnError
from attnlang.pattern import Env, Pattern, Pyramid
from attnlang.planner import make_plan

NAME = "show"
HELP = "draw a pattern's mask: ASCII in the terminal, or a PNG per head group (--png)"

DENSE_LIMIT = 8192  # largest N whose blocks are classified pair by pair (~67M predicate evaluations)
PNG_EXACT = 1024  # largest N drawn pixel-exact in a PNG
PNG_CELLS = 512  # resolution of a downsampled PNG panel
PLAN_TILE, MIN_PLAN_TILE = 256, 16  # the tile sizes the planner accepts


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    add_input_arguments(p)
    p.add_argument("--head", type=int, metavar="H", help="show only query head H (default: each head group)")
    p.add_argument("--width", type=int, default=64, metavar="W",
                   help="characters per row; larger N is downsampled to fit (default 64)")
    p.add_argument("--png", metavar="OUT", help="write a PNG picture of the mask to OUT (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    
    pattern = resolve_pattern(args)
    if isinstance(pattern.attend, Pyramid):
        raise AttnError(f"'{pattern.name}' is a pooled pyramid, not a mask: `show` draws masks",
                        hint=f"use `attnlang plan {args.file} -p {pattern.name}` to see its tiles")
    inputs = spec_inputs(args, pattern)
    content = sample_content(pattern)
    panels = head_panels(pattern, args.head)
    if args.png:
        write_png(pattern, panels, inputs, args.png, content)
        print(f"wrote {args.png} ({len(panels)} panel{'s' if len(panels) != 1 else ''}, N = {pattern.n})")
        return 0
    if args.width < 8:
        raise AttnError(f"--width {args.width} is too small", hint="use --width 8 or more")
    cell = cell_size(pattern.n, args.width)
    legend = ("'#' allowed, '.' not" if cell == 1 else
              f"downsampled: each character is {cell} x {cell} (query, key) pairs; "
              "'#' all allowed, '+' some, '.' none")
    print(f"{pattern.name}: N = {pattern.n}, tokens {pattern.layout.to_attn()}; {legend} "
          "(row = query, column = key)")
    chars = np.array([".", "+", "#"])
    for title, head in panels:
        if title:
            print(title + ":")
        m = cell_map(pattern, head, inputs, cell, content)
        sys.stdout.write("".join("  " + "".join(chars[row]) + "\n" for row in m))
    return 0


def head_panels(pattern: Pattern, head: int | None) -> list[tuple[str, int]]:
    """(title, representative head) for each head group to draw, or the one ``--head`` asks for."""
    heads = pattern.heads
    if head is not None:
        if head < 0 or (heads is not None and head >= heads):
            valid = f"0..{heads - 1}" if heads else "0 or more"
            raise AttnError(f"--head {head} is not a head of '{pattern.name}'", hint=f"valid heads: {valid}")
        return [(f"head {head}", head)]
    groups = pattern.exprs()
    if len(groups) == 1:
        return [("", 0)]
    return [(f"heads {lo}..{hi}", lo) for lo, hi, _ in groups]


def cell_size(n: int, width: int) -> int:
    """Tokens per character: 1 when N fits, else the smallest power of two that fits ``width``."""
    if n <= width:
        return 1
    c = 1
    while -(-n // c) > width:
        c *= 2
    return c


def cell_map(pattern: Pattern, head: int, inputs: Mapping[str, np.ndarray] | None, cell: int,
             content: Mapping | None = None) -> np.ndarray:
    """int8 ``[cells, cells]``: 0 no pair allowed, 1 some, 2 all, for square blocks of ``cell`` tokens.

    A ragged last block is judged on its real pairs only.
    """
    n = pattern.n
    if n > DENSE_LIMIT:
        return _plan_map(pattern, head, inputs, cell, content)
    return _classify(pattern, head, inputs, (0, n), (0, n), cell, content)


def _classify(pattern: Pattern, head: int, inputs, qs: tuple[int, int], ks: tuple[int, int],
              cell: int, content: Mapping | None = None) -> np.ndarray:
    """Classes of the blocks covering queries ``qs`` x keys ``ks`` (both start on a block edge),
    from the IR's predicate, a chunk of query rows at a time."""
    expr = pattern.expr_for_head(head)
    env = Env(pattern.layout, dict(inputs or {}), head, content=dict(content or {}))
    kidx = np.arange(*ks)
    keys = pattern.layout.points(kidx[None, :])
    nq, nk = -(-(qs[1] - qs[0]) // cell), -(-len(kidx) // cell)
    counts = np.zeros((nq, nk), dtype=np.int64)
    rows_per_chunk = max(cell, (1 << 22) // max(1, len(kidx)) // cell * cell)
    for lo in range(qs[0], qs[1], rows_per_chunk):
        hi = min(qs[1], lo + rows_per_chunk)
        q = pattern.layout.points(np.arange(lo, hi)[:, None])
        allowed = np.broadcast_to(expr.allowed(q, keys, env), (hi - lo, len(kidx))).astype(np.int64)
        per_key_block = np.add.reduceat(allowed, np.arange(0, len(kidx), cell), axis=1)
        first = (lo - qs[0]) // cell
        counts[first:first + -(-(hi - lo) // cell)] += np.add.reduceat(per_key_block, np.arange(0, hi - lo, cell), axis=0)
    q_sizes = np.diff(np.minimum(np.arange(nq + 1) * cell + qs[0], qs[1]))
    k_sizes = np.diff(np.minimum(np.arange(nk + 1) * cell + ks[0], ks[1]))
    return np.where(counts == 0, 0, np.where(counts == q_sizes[:, None] * k_sizes[None, :], 2, 1)).astype(np.int8)


def _plan_map(pattern: Pattern, head: int, inputs, cell: int, content: Mapping | None = None) -> np.ndarray:
    """Blocks classified from a natural-order tile plan: no N x N work, no dense tile map.

    Planner tiles are at most :data:`PLAN_TILE` tokens, so a block of ``cell`` tokens groups
    ``cell / tile`` tiles per side: all full -> 2, all empty -> 0, else 1, counted per block from
    the plan's tables (:meth:`Plan.tile_counts`: O(query tiles) for band rows). The tile is the
    largest that divides N, so no tile is ragged; when N is not a multiple of the smallest tile,
    the last tile row and column (under 16 tokens) are judged from the predicate on their real
    pairs (O(16 N) work).
    """
    n = pattern.n
    if cell < MIN_PLAN_TILE:
        raise AttnError(f"N = {n} is too large to draw at one character per {cell} tokens "
                        f"(blocks must be at least {MIN_PLAN_TILE} tokens beyond N = {DENSE_LIMIT})",
                        hint=f"use --width {n // MIN_PLAN_TILE} or less")
    tile = min(cell, PLAN_TILE)
    while tile > MIN_PLAN_TILE and n % tile:
        tile //= 2
    plan = make_plan(pattern, inputs=inputs, block_m=tile, block_n=tile, order="natural", content=content)
    f = cell // tile
    visited, full = plan.tile_counts(head, f, f)
    t = plan.q_tiles
    sizes = np.diff(np.minimum(np.arange(visited.shape[0] + 1) * f, t))
    if n % tile:
        # The plan never calls a ragged tile full: count the ragged row's and column's tiles whose
        # real pairs are all allowed from the predicate (per tile of the last tile row/column).
        last = (t - 1) * tile
        row = _classify(pattern, head, inputs, (last, n), (0, n), tile, content)[0] == 2
        col = _classify(pattern, head, inputs, (0, n), (last, n), tile, content)[:, 0] == 2
        starts = np.arange(0, t, f)
        full = full.copy()
        full[-1, :] += np.add.reduceat(row.astype(np.int64), starts)
        full[:, -1] += np.add.reduceat(col.astype(np.int64), starts)
        full[-1, -1] -= int(row[-1])
    total = sizes[:, None] * sizes[None, :]
    return np.where(visited == 0, 0, np.where(full == total, 2, 1)).astype(np.int8)


def write_png(pattern: Pattern, panels: list[tuple[str, int]], inputs, out: str,
              content: Mapping | None = None) -> None:
    """One panel per head group: white = allowed, black = not; grey = partly allowed blocks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError:
        raise AttnError("--png needs matplotlib", hint="pip install 'attnlang[plot]'") from None
    n = pattern.n
    cell = 1 if n <= PNG_EXACT else cell_size(n, PNG_CELLS)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (title, head) in zip(axes[0], panels):
        m = cell_map(pattern, head, inputs, cell, content) / 2.0
        ax.imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest", extent=(0, n, n, 0))
        ax.set_title(f"{pattern.name}" + (f" ({title})" if title else ""), fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        for axis in (ax.xaxis, ax.yaxis):  # few, short labels: "80k", not "80000100000"
            axis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            axis.set_major_formatter(FuncFormatter(lambda x, _: tick_label(x)))
    density = _density_note(pattern, cell)
    if density:
        fig.suptitle(density, fontsize=8, y=0.02)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise AttnError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(fig)


def tick_label(x: float) -> str:
    """A short axis label: 512, 80k, 1.5M (``k`` = 1000, so 100000 reads 100k)."""
    x = int(round(x))
    for div, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1000, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.0f}{unit}" if v == int(v) or abs(v) >= 100 else f"{v:.1f}".rstrip("0").rstrip(".") + unit
    return str(x)


def _density_note(pattern: Pattern, cell: int) -> str:
    return "" if cell == 1 else f"N = {pattern.n}: each pixel is {cell} x {cell} pairs (grey = partly allowed)"

