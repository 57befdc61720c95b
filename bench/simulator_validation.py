"""Validate the simulator on the CPU: calibrate, predict the torch backend's speedups, measure.

    $ .venv/bin/python bench/simulator_validation.py            # every static example (minutes)
    $ .venv/bin/python bench/simulator_validation.py --quick    # one timed run each
    $ .venv/bin/python bench/simulator_validation.py --only swa --only na2d

1. calibrates a ``cpu`` profile on this machine (``attnlang calibrate``'s patterns and fit, at
   ``--calib-n`` tokens, 4096 by default: the size most cases run at, so per-tile costs are
   not extrapolated across sizes), without writing it anywhere;
2. for every static pattern of ``examples/*.attn`` (the ones that read Q/K are skipped; runtime
   inputs get ``bench/cpu.py``'s sample inputs) at a size of at most about 4k tokens
   (``SIZES``; ``--set PATTERN:K=V`` overrides) predicts the torch backend's speedup over its
   own dense run (``simulate_plan(...).forward.predicted`` / ``.backward.predicted``);
3. measures that speedup: the pattern and the dense pattern at the same N and heads, timed
   round-robin (so load hits both alike), medians of ``--repeat``;
4. prints a Markdown table: predicted, measured, error (predicted / measured - 1), per direction,
   with the load average before and after.

Timings need a quiet machine: on a loaded one the table measures the load, not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from cpu import example_patterns, load, parse_sets, sample_inputs  # noqa: E402

from attnlang.api import make_plan  # noqa: E402
from attnlang.commands.calibrate import calibrate_cpu, time_patterns  # noqa: E402
from attnlang.pattern import Pattern, full  # noqa: E402
from attnlang.simulate import simulate_plan  # noqa: E402
from attnlang.targets import target_from_dict  # noqa: E402

# At most about 4k tokens (the dense run of every pattern is timed too), same kind of parameters.
SIZES: dict[str, dict] = {
    "swa": {"N": 4096, "W": 2048},
    "duo": {"N": 4096, "sinks": 64, "recent": 256},
    "strided_na1d": {"N": 4096, "K": 512, "s": 128},
    "packed_docs": {"N": 4096},
    "gna_flux": {"H": 64, "W": 64, "K": 32, "s": 8},
    "na3d": {"T": 4, "H": 32, "W": 32, "K": (4, 12, 12), "s": (2, 4, 4)},
    "na3d_causal": {"T": 4, "H": 32, "W": 32, "K": (4, 13, 13)},
    "frame_causal": {"T": 4, "H": 32, "W": 32},
}
TOLERANCE = 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-n", type=int, default=4096,
                    help="tokens of the calibration patterns (default 4096: the size of most cases)")
    ap.add_argument("--heads", type=int, default=8, help="heads (patterns that declare theirs keep them)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="one timed run per measurement")
    ap.add_argument("--only", action="append", metavar="NAME", help="a pattern or example file stem (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="PATTERN:K=V", help="override a parameter")
    ap.add_argument("--save-profile", metavar="FILE", help="also write the calibrated cpu profile there")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's). On a shared machine use 1: "
                    "with 2 threads every parallel region waits a scheduler slice (~8 ms measured) while "
                    "another process runs, which swamps the tile work")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    before = load()

    say = lambda what: print(f"  {what} ...", file=sys.stderr, flush=True)  # noqa: E731
    print("calibrating", file=sys.stderr)
    doc = calibrate_cpu(args.calib_n, args.heads, args.head_dim, max(repeat, 3), progress=say)
    target = target_from_dict(doc, "<calibrated>")
    if args.save_profile:
        pathlib.Path(args.save_profile).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    sets = parse_sets(args.set)
    pats, skipped = example_patterns(args.only, {k: {**v, **sets.get(k, {})} for k, v in SIZES.items()}
                                     | {k: v for k, v in sets.items() if k not in SIZES})
    rows, misses = [], 0
    for _, p in pats:
        heads = p.heads or args.heads
        inputs = sample_inputs(p) if p.inputs else None
        print(f"{p.name} (N = {p.n}, H = {heads})", file=sys.stderr, flush=True)
        plan = make_plan(p, inputs=inputs)
        r = simulate_plan(plan, target, dtype="fp32", head_dim=args.head_dim, heads=heads, inputs=inputs)
        dense = Pattern.create(full, p.layout.sizes if p.layout.rank > 1 else p.n, heads=p.heads, name="dense")
        t = time_patterns({"dense": dense, "pattern": p}, heads, args.head_dim, repeat,
                          inputs={"pattern": inputs}, progress=say)
        (df, db), (f, b) = t["dense"], t["pattern"]
        mf, mb = df / f, db / b
        pf, pb = r.forward.predicted, r.backward.predicted
        ef, eb = pf / mf - 1, pb / mb - 1
        misses += (abs(ef) > TOLERANCE) + (abs(eb) > TOLERANCE)
        rows.append(f"| `{p.name}` | {p.n} | {heads} | {1e3 * df:.0f} / {1e3 * f:.0f} | {pf:.2f}x | {mf:.2f}x | "
                    f"{100 * ef:+.0f}% | {1e3 * db:.0f} / {1e3 * b:.0f} | {pb:.2f}x | {mb:.2f}x | {100 * eb:+.0f}% |")
    cal = doc["forward"]
    import torch

    print(f"\nMachine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; load average before {before}, after {load()}. Calibrated at "
          f"N = {args.calib_n}: {doc['tflops']['fp32'] * 1e3:.1f} GFLOP/s per tile slot, forward mask cost "
          f"{cal['mask_cost']:.2f}, gather cost {cal['gather_cost']:.2f}, per call {cal['chunk_overhead_ns'] / 1e3:.0f} us, "
          f"per query tile {cal['cta_overhead_ns'] / 1e3:.0f} us, token moves {doc['bandwidth_gbs']:.0f} GB/s, backward/forward "
          f"{doc['backward']['flop_ratio']:.2f}x. D = {args.head_dim}, fp32, B = 1, median of {repeat}.\n")
    res = doc["calibration"]["residuals"]
    print("Calibration fit (fitted / measured - 1): " + "; ".join(
        f"{m['pattern']}: forward {100 * f:+.0f}%, backward {100 * b:+.0f}%"
        for m, f, b in zip(doc["calibration"]["measurements"], res["forward"], res["backward"])) + "\n")
    print("| pattern | N | H | fwd ms dense / sparse | predicted fwd | measured fwd | error "
          "| bwd ms dense / sparse | predicted bwd | measured bwd | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\n{2 * len(rows) - misses} of {2 * len(rows)} predictions within {100 * TOLERANCE:.0f}%.")
    for name, why in skipped:
        print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
