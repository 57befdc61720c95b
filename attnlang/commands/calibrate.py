"""``attnlang calibrate --target cpu [-o FILE]``: measure this machine and write a cpu profile.

    $ attnlang calibrate --target cpu
    wrote ~/.config/attnlang/targets/cpu.json (fp32 0.061 TFLOP/s per tile slot, ...)

Runs the CPU ``torch`` backend (torch is imported only here) on the dense pattern and on two
sparse ones at one size, and fits the simulator's per-direction costs to the times:

    time = CTAs * cta_overhead + slots * t_tile + masked slots * t_tile * mask_cost

with the slot counts the simulator itself derives from each plan (:func:`attnlang.simulate.pass_work`),
so a calibrated profile predicts exactly what it measured and extrapolates from there. The
profile goes to the user profile directory (``attnlang.targets.user_dir()``), where
:func:`attnlang.simulate` prefers it over the packaged one, or to ``-o FILE``.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import numpy as np

from attnlang.errors import AttnError

NAME = "calibrate"
HELP = "measure this machine with the CPU backend and write a simulator target profile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", metavar="T", help="which profile to calibrate (only cpu)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write the profile (default: the user profile dir)")
    p.add_argument("--n", type=int, default=2048, metavar="N", help="sequence length measured (default 2048)")
    p.add_argument("--heads", type=int, default=8, metavar="H", help="heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, metavar="D", help="head dimension (default 64)")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="timed runs per pattern (median; default 3)")


def run(args: argparse.Namespace) -> int:
    from attnlang.targets import user_dir

    if args.target != "cpu":
        raise AttnError(f"cannot calibrate target '{args.target}': only 'cpu' is measured here",
                        hint="GPU profiles are data: copy a packaged one (attnlang/targets/h100.json), "
                             "put your measured numbers in, and pass its path as --target")
    for flag, v in (("--n", args.n), ("--heads", args.heads), ("--head-dim", args.head_dim),
                    ("--repeat", args.repeat)):
        if v < 1:
            raise AttnError(f"{flag} {v} must be a positive integer")
    if args.n < 256:
        raise AttnError(f"--n {args.n} is too small to time reliably", hint="use --n 1024 or more")
    doc = calibrate_cpu(args.n, args.heads, args.head_dim, args.repeat)
    out = pathlib.Path(args.output) if args.output else user_dir() / "cpu.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise AttnError(f"cannot write {out}: {e}") from None
    f = doc["forward"]
    print(f"wrote {out}: {doc['tflops']['fp32'] * 1e3:.1f} GFLOP/s per tile, mask cost {f['mask_cost']:.2f}, "
          f"per-query-tile overhead {f['cta_overhead_ns'] / 1e3:.1f} us, backward/forward "
          f"{doc['backward']['flop_ratio']:.2f}x, bandwidth {doc['bandwidth_gbs']:.1f} GB/s")
    return 0


# The measured patterns: dense (the baseline), a block-diagonal one (full tiles only, fewer per
# row: separates per-tile from per-query-tile cost) and a causal window (partial tiles: mask cost).
def calibration_patterns(n: int) -> dict[str, Any]:
    from attnlang.pattern import Pattern, block, causal, full, sliding

    return {"full": Pattern.create(full, n, name="full"),
            "block": Pattern.create(block(max(n // 4, 1)), n, name="block"),
            "causal_window": Pattern.create(causal & sliding(max(n // 8, 1)), n, name="causal_window")}


def time_backend(pattern, heads: int, head_dim: int, repeat: int, backend: str = "torch") -> tuple[float, float]:
    """Median ``(forward seconds, backward seconds)`` of one backend on random fp32 inputs."""
    import torch

    import attnlang

    fn = attnlang.compile(pattern, backend=backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, pattern.n, head_dim, generator=g, requires_grad=True) for _ in range(3))

    def fwd() -> Any:
        return fn(q, k, v)

    def both() -> None:
        fwd().sum().backward()

    f = _median(fwd, repeat)
    b = _median(both, repeat)
    return f, max(b - f, 0.0)


def _median(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: plans, schedules and caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidth_gbs() -> float:
    import torch

    x = torch.empty(1 << 24, dtype=torch.float32).uniform_()
    t = _median(lambda: x.clone(), 3)
    return 2 * x.numel() * 4 / t / 1e9


def fit_costs(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative least squares by enumerating the active set (3 unknowns: tiny).

    ``features [m, 3]`` = (CTAs, slots, masked slots) per measurement; returns
    ``(cta seconds, slot seconds, mask seconds per masked slot)``.
    """
    best, best_err = np.zeros(features.shape[1]), float("inf")
    for k in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), k):
            sol, *_ = np.linalg.lstsq(features[:, cols], times, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(features.shape[1])
            x[list(cols)] = sol
            err = float(np.sum((features @ x - times) ** 2))
            # Prefer the fit with the slot cost (the model's core) when errors tie.
            if err < best_err - 1e-18 or (abs(err - best_err) <= 1e-18 and x[1] > 0 >= best[1]):
                best, best_err = x, err
    return best


def calibrate_cpu(n: int = 2048, heads: int = 8, head_dim: int = 64, repeat: int = 3) -> dict[str, Any]:
    """Measure the torch backend here and return a ``cpu`` profile document."""
    try:
        import torch
    except ImportError:
        raise AttnError("calibrating the cpu target needs torch", hint="pip install torch") from None
    from attnlang.api import make_plan
    from attnlang.runtime import BACKENDS
    from attnlang.simulate import pass_work
    from attnlang.targets import load_target

    if "torch" not in BACKENDS:
        raise AttnError("calibration needs the 'torch' backend, which this installation lacks",
                        hint=f"available backends: {', '.join(BACKENDS)}")
    base = load_target(pathlib.Path(__file__).parent.parent / "targets" / "cpu.json")
    measurements, feats = [], {"forward": [], "backward": []}
    times = {"forward": [], "backward": []}
    bm = bn = None
    for name, pattern in calibration_patterns(n).items():
        plan = make_plan(pattern)
        bm, bn = plan.block_m, plan.block_n
        f, b = time_backend(pattern, heads, head_dim, repeat)
        measurements.append({"pattern": pattern.attend.to_attn(), "forward_s": f, "backward_s": b,
                             "block_m": bm, "block_n": bn})
        for direction, t in (("forward", f), ("backward", b)):
            ws = pass_work(plan, base, direction, heads)
            feats[direction].append([sum(len(w.full) for w in ws),
                                     sum(float((w.full + w.partial + w.padding).sum()) * w.share for w in ws),
                                     sum(float(w.masked.sum()) * w.share for w in ws)])
            times[direction].append(t)
    fits = {d: fit_costs(np.array(feats[d]), np.array(times[d])) for d in feats}
    cf, tf, mf = fits["forward"]
    cb, tb, mb = fits["backward"]
    if tf <= 0 or tb <= 0:
        raise AttnError(f"calibration failed: the measured times {times} (dense, block, causal window) "
                        "do not fit time = CTAs * c + slots * t + masked slots * t * mask with t > 0",
                        hint="a busy machine, or a backend whose sparse path is slower per tile than its "
                             "dense one; rerun on a quiet machine with a larger --n or --repeat")
    tile_flops = 4.0 * bm * bn * head_dim
    return {
        "name": "cpu", "kind": "cpu",
        "description": f"this machine ({torch.get_num_threads()} threads), torch {torch.__version__} tile executor, fp32",
        "source": f"measured by `attnlang calibrate` on {datetime.date.today().isoformat()}",
        "units": 1, "cores": torch.get_num_threads(),
        "tflops": {"fp32": tile_flops / tf / 1e12},
        "bandwidth_gbs": _bandwidth_gbs(), "head_dim": head_dim, "index_read_ns": 0.0,
        "forward": {"efficiency": 1.0, "tile_fixed_ns": 0.0, "mask_cost": mf / tf, "cta_overhead_ns": cf * 1e9},
        "backward": {"efficiency": 1.0, "flop_ratio": tb / tf, "tile_fixed_ns": 0.0, "mask_cost": mb / tb,
                     "cta_overhead_ns": cb * 1e9},
        "executor": {"pad_rows": base.executor.pad_rows, "mask_whole_row": base.executor.mask_whole_row,
                     "backward": base.executor.backward},
        "calibration": {"n": n, "heads": heads, "head_dim": head_dim, "repeat": repeat,
                        "measurements": measurements},
    }
