"""Validate the simulator on the CPU: calibrate, predict the torch backend's speedups, measure.

    $ .venv/bin/python bench/simulator_validation.py [--n 4096] [--heads 8] [--head-dim 64]

1. calibrates a ``cpu`` profile on this machine (dense + two patterns, see
   ``attnlang calibrate``), without writing it anywhere;
2. for several patterns predicts the torch backend's speedup over its own dense run
   (``simulate(...).forward.predicted`` / ``.backward.predicted``);
3. measures those speedups and prints a Markdown table: predicted, measured, error.

Timings need a quiet machine: on a loaded one the table measures the load, not the model.
"""
from __future__ import annotations

import argparse

from attnlang.api import make_plan
from attnlang.commands.calibrate import calibrate_cpu, time_backend
from attnlang.pattern import Pattern, block, causal, full, halo, sink, sliding, strided, window
from attnlang.simulate import simulate_plan
from attnlang.targets import target_from_dict


def cases(n: int) -> dict:
    return {
        "causal & sliding(256)": causal & sliding(256),
        "sliding(128)": sliding(128),
        f"block({n // 16})": block(n // 16),
        "causal": causal,
        "causal & (sliding(128) | sink(64))": causal & (sliding(128) | sink(64)),
        "window(before=1024, after=0)": window(before=1024, after=0),
        f"halo(block={n // 32}, halo=32)": halo(n // 32, 32),
        "strided(4) & causal": strided(4) & causal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    target = target_from_dict(calibrate_cpu(args.n // 2, args.heads, args.head_dim, args.repeat), "<calibrated>")
    dense_f, dense_b = time_backend(Pattern.create(full, args.n, name="dense"), args.heads,
                                    args.head_dim, args.repeat)
    print(f"calibrated at N = {args.n // 2}; dense torch backend at N = {args.n}: "
          f"forward {dense_f * 1e3:.0f} ms, backward {dense_b * 1e3:.0f} ms\n")
    print("| pattern | predicted fwd | measured fwd | error | predicted bwd | measured bwd | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, expr in cases(args.n).items():
        p = Pattern.create(expr, args.n, name=name)
        r = simulate_plan(make_plan(p), target, dtype="fp32", head_dim=args.head_dim, heads=args.heads)
        f, b = time_backend(p, args.heads, args.head_dim, args.repeat)
        mf, mb = dense_f / f, dense_b / b if b else float("inf")
        pf, pb = r.forward.predicted, r.backward.predicted
        print(f"| `{name}` | {pf:.2f}x | {mf:.2f}x | {100 * (pf / mf - 1):+.0f}% "
              f"| {pb:.2f}x | {mb:.2f}x | {100 * (pb / mb - 1):+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
