"""``attnlang simulate FILE``: predicted speedup over dense attention on a hardware target.

    $ attnlang simulate examples/swa.attn --target h100 --set N=32768
    $ attnlang simulate examples/swa.attn --sweep N=4k..1M --png swa.png

Prints a terminal table by default (bounds, predicted times, where the time goes); ``--md``
Markdown, ``--json`` the report's JSON (schema ``attnlang.report/1``, or ``attnlang.sweep/1``
with ``--sweep``), ``--png OUT`` a picture: the mask (small N) or the tile map, next to the
speedup bounds (against the swept parameter with ``--sweep``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from attnlang.api import make_plan, sweep
from attnlang.commands import (
    add_input_arguments, add_spec_arguments, check_tile_flags, resolve_pattern, spec_inputs, spec_params,
)
from attnlang.errors import AttnError
from attnlang.simulate import (
    format_speedup, format_time, json_safe, parse_sweep, sample_content, simulate_plan, simulate_ranks,
)
from attnlang.targets import load_target

NAME = "simulate"
HELP = "predict the speedup over dense attention on a GPU/CPU target (bounds, times, breakdown)"
MASK_PICTURE_MAX_N = 2048


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    add_input_arguments(p)
    p.add_argument("--target", default="h100", metavar="T",
                   help="hardware profile: h100, h200, b200, a100, cpu, or a .json profile path")
    p.add_argument("--dtype", metavar="D", help="bf16 / fp16 / fp8 / fp32 (default: bf16 on GPUs, fp32 on cpu)")
    p.add_argument("--head-dim", type=int, default=128, metavar="D", help="head dimension (default 128)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--heads", type=int, metavar="HEADS",
                   help="query head count (default: the pattern's `heads`, else 8); tile counts are "
                        "totals over these heads")
    p.add_argument("--block-m", type=int, metavar="M", help="query tile size in tokens")
    p.add_argument("--block-n", type=int, metavar="N", help="key tile size in tokens")
    p.add_argument("--sweep", metavar="K=LO..HI", help="sweep a parameter, doubling: e.g. N=1k..1M")
    p.add_argument("--ranks", type=int, metavar="R",
                   help="context parallelism over R ranks: per-rank work, bytes moved, step time")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--md", action="store_true", help="print Markdown")
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--png", metavar="OUT", help="write a PNG picture to OUT")


def run(args: argparse.Namespace) -> int:

    for flag, v in (("--head-dim", args.head_dim), ("--batch", args.batch), ("--heads", args.heads),
                    ("--ranks", args.ranks)):
        if v is not None and v < 1:
            raise AttnError(f"{flag} {v} must be a positive integer")
    check_tile_flags(args)
    target = load_target(args.target)
    sweep_spec = parse_sweep(args.sweep) if args.sweep else None
    params = spec_params(args)
    path = pathlib.Path(args.file)
    pattern = resolve_pattern(args)
    inputs = spec_inputs(args, pattern)
    # Patterns that read Q/K are planned for seeded Gaussian Q/K (the report notes it).
    content = sample_content(pattern, args.heads or pattern.heads or 8, args.head_dim)
    plan = make_plan(pattern, inputs=inputs, block_m=args.block_m, block_n=args.block_n, content=content)
    kw = dict(dtype=args.dtype, head_dim=args.head_dim, batch=args.batch, heads=args.heads)
    report = simulate_plan(plan, target, inputs=inputs, content=content, **kw)
    ranks = None
    if args.ranks is not None:
        ranks = simulate_ranks(plan, args.ranks, target, report=report, **kw)
    points = None
    if sweep_spec is not None:
        name, values = sweep_spec
        points = sweep(path, name, values, target, args.pattern, progress=_progress(len(values)),
                       inputs=inputs, block_m=args.block_m, block_n=args.block_n,
                       **{k: v for k, v in kw.items() if v is not None}, **params)
    if args.json:
        doc = report.to_dict() if points is None else {
            "schema": "attnlang.sweep/1", "parameter": sweep_spec[0], "report": report.to_dict(),
            "points": [_finite_point(p) for p in points]}
        if ranks is not None:
            doc["ranks"] = ranks.to_dict()
        print(json.dumps(doc, indent=1))
    elif args.png:
        write_png(args.png, report, plan, pattern, inputs, points, sweep_spec[0] if sweep_spec else None)
        print(f"wrote {args.png}")
    elif args.md:
        print(report.to_markdown())
        if ranks is not None:
            print(ranks.to_markdown())
        if points is not None:
            print(sweep_markdown(sweep_spec[0], points))
    else:
        print(report)
        if ranks is not None:
            print()
            print(ranks)
        if points is not None:
            print()
            print(sweep_table(sweep_spec[0], points))
    return 0


def _progress(count: int):
    """A tqdm bar on a terminal for sweeps of more than a few sizes (tqdm is optional)."""
    if count <= 4 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda it: tqdm(it, total=count, desc="sweep", unit="size", file=sys.stderr)


def _finite_point(p) -> dict:
    from dataclasses import asdict

    return json_safe(asdict(p))


def _sweep_rows(name: str, points) -> list[list[str]]:
    with_n = name != "N"  # sweeping another parameter: show the N it gives too
    rows = [[name] + (["N"] if with_n else []) +
            ["FLOP bound", "tile bound", "schedule bound", "predicted fwd", "predicted bwd", "time fwd"]]
    for p in points:
        rows.append([str(p.value)] + ([str(p.n)] if with_n else []) +
                    [format_speedup(p.flop_bound), format_speedup(p.tile_bound), format_speedup(p.schedule_bound),
                     format_speedup(p.predicted), format_speedup(p.backward_predicted), format_time(p.time_s)])
    return rows


def sweep_markdown(name: str, points) -> str:
    rows = _sweep_rows(name, points)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + " ---: |" * len(rows[0]))
    return "\n".join(lines)


def sweep_table(name: str, points) -> str:
    rows = _sweep_rows(name, points)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def write_png(out: str, report, plan, pattern, inputs, points, sweep_name: str | None) -> None:
    """The mask (N <= 2048) or the tile map, next to the bounds (against the swept parameter)."""
    try:
        import matplotlib
    except ImportError:
        raise AttnError("--png needs matplotlib", hint="pip install matplotlib, or use --md / --json") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    if pattern.n <= MASK_PICTURE_MAX_N:
        left.imshow(pattern.mask(heads=1, inputs=inputs)[0], cmap="Greys", interpolation="nearest")
        left.set_title(f"mask of {pattern.name} (N = {pattern.n})")
        left.set_xlabel("key")
        left.set_ylabel("query")
    else:
        # Downsampled from the plan's tables (never a dense q_tiles x kv_tiles map); the extent
        # keeps the axes in tiles.
        left.imshow(plan.tile_cells(0, 512, 512), cmap=ListedColormap(["white", "tab:orange", "tab:blue"]),
                    vmin=0, vmax=2, interpolation="nearest", extent=(0, plan.kv_tiles, plan.q_tiles, 0))
        left.set_title(f"tile map (blue full, orange partial), {plan.block_m} x {plan.block_n}")
        left.set_xlabel("key tile")
        left.set_ylabel("query tile")
    names = ("FLOP bound", "tile bound", "schedule bound", "predicted")
    if points:
        xs = [p.value for p in points]
        for label, attr in zip(names, ("flop_bound", "tile_bound", "schedule_bound", "predicted")):
            right.plot(xs, [getattr(p, attr) for p in points], marker="o", label=label)
        right.plot(xs, [p.backward_predicted for p in points], marker="x", linestyle="--", label="predicted (backward)")
        right.set_xscale("log", base=2)
        right.set_yscale("log")
        right.set_xlabel(sweep_name)
        right.legend()
    else:
        import numpy as np

        x = np.arange(len(names))
        for i, d in enumerate(("forward", "backward")):
            vals = [getattr(getattr(report, d), a) for a in ("flop_bound", "tile_bound", "schedule_bound", "predicted")]
            right.bar(x + (i - 0.5) * 0.38, [v if np.isfinite(v) else 0 for v in vals], 0.38, label=d)
        right.set_xticks(x, names)
        right.legend()
    right.set_ylabel("speedup over dense")
    right.set_title(f"{report.target}, {report.dtype}, D = {report.head_dim}, {report.heads} heads")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise AttnError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(fig)
