"""``attnlang plan FILE``: print the tile plan of a pattern (tile map, statistics, loop nest).

    $ attnlang plan examples/swa.attn --set N=16384
    plan swa: N = 16384, tokens n[16384], tiles 128 x 128 ...

The plan is built by :func:`attnlang.make_plan` without evaluating the N x N mask, so paper
sizes (a 115k-token video latent) plan in well under a second. ``--json`` prints
:meth:`Plan.to_json` instead. Explicit tile sizes and ``--order`` override the pattern's
``schedule`` lines, which override the planner's choice.
"""
from __future__ import annotations

import argparse

from attnlang.api import make_plan
from attnlang.commands import (
    add_input_arguments, add_spec_arguments, check_tile_flags, resolve_pattern, sample_content,
    spec_inputs,
)
from attnlang.errors import AttnError, did_you_mean
from attnlang.pattern import ORDERS

NAME = "plan"
HELP = "plan a pattern's tile schedule and print it (or --json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    add_input_arguments(p)
    p.add_argument("--block-m", type=int, metavar="M", help="query tile size in tokens")
    p.add_argument("--block-n", type=int, metavar="N", help="key tile size in tokens")
    p.add_argument("--order", metavar="O", help=f"token order: {', '.join(ORDERS)}")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    check_tile_flags(args)
    if args.order is not None and args.order not in ORDERS:
        raise AttnError(f"unknown --order '{args.order}'{did_you_mean(args.order, ORDERS)}",
                        hint=f"valid orders: {', '.join(ORDERS)}")
    pattern = resolve_pattern(args)
    plan = make_plan(pattern, inputs=spec_inputs(args, pattern), block_m=args.block_m,
                     block_n=args.block_n, order=args.order, content=sample_content(pattern))
    print(plan.to_json() if args.json else plan)
    return 0
