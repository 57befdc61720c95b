"""``attnlang calibrate --target cpu [-o FILE]``: measure this machine and write a cpu profile.

    $ attnlang calibrate --target cpu
    wrote ~/.config/attnlang/targets/cpu.json (fp32 0.061 TFLOP/s per tile slot, ...)

Runs the CPU ``torch`` backend (torch is imported only here) on the dense pattern and on seven
sparse ones at one size (timed round-robin, medians of ``--repeat``), and fits the simulator's
per-direction costs to the times by non-negative least squares:

    time = calls * call_overhead + query tiles * tile_overhead + slots * t_tile
           + masked slots * t_tile * mask_cost + gathered slots * t_tile * gather_cost

with the counts the simulator itself derives from each plan (:func:`attnlang.simulate.pass_work`,
which lays the plan out as the executor does: :mod:`attnlang.rows`),
so a calibrated profile predicts what it measured and extrapolates from there. A fit that
misses any measurement by more than 35% is refused with the measurements in the error. The
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
import sys
import time
from typing import Any, Callable

import numpy as np

import attnlang
from attnlang.api import make_plan
from attnlang.errors import AttnError
from attnlang.pattern import Pattern, block, causal, full, sink, sliding
from attnlang.rows import CHUNK_BYTES
from attnlang.runtime import BACKENDS
from attnlang.simulate import pass_work
from attnlang.targets import load_target, user_dir

NAME = "calibrate"
HELP = "measure this machine with the CPU backend and write a simulator target profile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", metavar="T", help="which profile to calibrate (only cpu)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write the profile (default: the user profile dir)")
    p.add_argument("--n", type=int, default=4096, metavar="N", help="sequence length measured (default 4096)")
    p.add_argument("--heads", type=int, default=8, metavar="H", help="heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, metavar="D", help="head dimension (default 64)")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="timed runs per pattern (median; default 3)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads to measure with (default: torch's; the profile is for that many)")


def run(args: argparse.Namespace) -> int:
    if args.target != "cpu":
        raise AttnError(f"cannot calibrate target '{args.target}': only 'cpu' is measured here",
                        hint="GPU profiles are data: copy a packaged one (attnlang/targets/h100.json), "
                             "put your measured numbers in, and pass its path as --target")
    for flag, v in (("--n", args.n), ("--heads", args.heads), ("--head-dim", args.head_dim),
                    ("--repeat", args.repeat)):
        if v < 1:
            raise AttnError(f"{flag} {v} must be a positive integer")
    if args.threads is not None:
        if args.threads < 1:
            raise AttnError(f"--threads {args.threads} must be a positive integer")
        import torch

        torch.set_num_threads(args.threads)
    if args.n < 2048:
        raise AttnError(f"--n {args.n} is too small to calibrate: below 2048 tokens the per-call costs swamp "
                        "the per-tile ones and the fit cannot tell them apart", hint="use --n 2048 or more (default 4096)")
    doc = calibrate_cpu(args.n, args.heads, args.head_dim, args.repeat,
                        progress=lambda name: print(f"measuring {name} ...", file=sys.stderr))
    out = pathlib.Path(args.output) if args.output else user_dir() / "cpu.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise AttnError(f"cannot write {out}: {e}") from None
    f = doc["forward"]
    print(f"wrote {out}: {doc['tflops']['fp32'] * 1e3:.1f} GFLOP/s per tile, mask cost {f['mask_cost']:.2f}, "
          f"gather cost {f['gather_cost']:.2f}, per-call overhead {f['chunk_overhead_ns'] / 1e3:.1f} us, "
          f"per-query-tile overhead {f['cta_overhead_ns'] / 1e3:.1f} us, backward/forward "
          f"{doc['backward']['flop_ratio']:.2f}x, bandwidth {doc['bandwidth_gbs']:.1f} GB/s")
    return 0


# The measured patterns, each exercising a different term of the model: dense (many full slots
# per query tile, one query tile per fused call), blocks of three sizes (N/4, N/16 and one tile:
# full tiles only, fewer
# per query tile, up to 32 query tiles per call: separates per-slot, per-query-tile and per-call
# costs), causal (ragged rows: padding and masks on every call), a causal window (partial tiles
# on every row: the mask cost) and two patterns whose rows are not windows of consecutive key
# tiles (a sink tile beside each row's own tiles: the gather cost, with and without masks).
# Eight measurements, five unknowns per direction.
def calibration_patterns(n: int) -> dict[str, Any]:
    tile = 64  # the CPU planner's tile: block(tile) is one key tile per query tile, sink(tile) one tile
    return {"full": Pattern.create(full, n, name="full"),
            "block(N/4)": Pattern.create(block(max(n // 4, 1)), n, name="block4"),
            "block(N/16)": Pattern.create(block(max(n // 16, 1)), n, name="block16"),
            "block(64)": Pattern.create(block(tile), n, name="block64"),
            "causal": Pattern.create(causal, n, name="causal"),
            "causal & sliding(N/8)": Pattern.create(causal & sliding(max(n // 8, 1)), n, name="causal_window"),
            "causal & (sliding(N/8) | sink)": Pattern.create(causal & (sliding(max(n // 8, 1)) | sink(tile)), n,
                                                           name="causal_window_sink"),
            "block(N/16) | sink": Pattern.create(block(max(n // 16, 1)) | sink(tile), n, name="block16_sink")}


def time_patterns(patterns: dict[str, Any], heads: int, head_dim: int, repeat: int,
                  inputs: dict[str, dict] | None = None, backend: str = "torch",
                  progress: Callable[[str], None] | None = None) -> dict[str, tuple[float, float]]:
    """Median ``(forward seconds, backward seconds)`` per pattern on random fp32 inputs.

    The timed runs go round-robin over the patterns (one warm-up each first), so a load spike on
    a shared machine hits every pattern alike instead of one; the backward is timed on its own
    (after an untimed forward), not as a difference of two noisy totals.
    """
    import torch

    runs = {}
    for name, pattern in patterns.items():
        fn = attnlang.compile(pattern, backend=backend)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, pattern.n, head_dim, generator=g, requires_grad=True) for _ in range(3))
        kw = {key: torch.as_tensor(np.asarray(x)) for key, x in ((inputs or {}).get(name) or {}).items()}
        runs[name] = (fn, q, k, v, kw)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in patterns}

    def once(name: str) -> tuple[float, float]:
        fn, q, k, v, kw = runs[name]
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(q, k, v, **kw)
            f = time.perf_counter() - t0
        out = fn(q, k, v, **kw).sum()
        t0 = time.perf_counter()
        out.backward()
        return f, time.perf_counter() - t0

    for name in patterns:  # warm-up: plans, schedules, caches
        if progress:
            progress(name)
        once(name)
    for _ in range(repeat):
        for name in patterns:
            f, b = once(name)
            times[name][0].append(f)
            times[name][1].append(b)
    return {name: (statistics.median(fs), statistics.median(bs)) for name, (fs, bs) in times.items()}


def _bandwidth_gbs(n: int, heads: int, head_dim: int) -> float:
    """GB/s (read + write) of the executor's token moves: ``index_select`` of an fp32
    ``[heads, n, head_dim]`` tensor by a permutation of its tokens, which is what the permutation
    passes are. A streaming copy of a large buffer measures DRAM instead (4-6x slower here):
    these tensors are moved while they are still in cache."""
    import torch

    x = torch.randn(heads, n + 1, head_dim)
    perm = torch.randperm(n + 1)
    for _ in range(3):  # warm-up: first-touch page faults, allocator
        x.index_select(1, perm)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        x.index_select(1, perm)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times) / 1e9


def fit_costs(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative least squares on *relative* errors, by enumerating the active set.

    ``features [m, k]`` = (calls, query tiles, slots, masked slots, gathered slots) per
    measurement; returns the seconds of each. Each row is divided by its measured time, so a
    20 ms pattern counts as much as a 2 s one.
    """
    w = 1.0 / np.maximum(times, 1e-12)
    a, y = features * w[:, None], times * w
    best, best_err = np.zeros(features.shape[1]), float("inf")
    for k in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), k):
            sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(features.shape[1])
            x[list(cols)] = sol
            err = float(np.sum((a @ x - y) ** 2))
            # Prefer the fit with the slot cost (the model's core) when errors tie.
            if err < best_err - 1e-12 or (abs(err - best_err) <= 1e-12 and x[SLOT] > 0 >= best[SLOT]):
                best, best_err = x, err
    return best


MAX_RESIDUAL = 0.35  # largest relative misfit of one calibration measurement that is accepted
SLOT = 2  # column of the per-slot cost in features()


def features(plan, target, direction: str, heads: int) -> list[float]:
    """``(calls, query tiles, slots, masked slots, gathered slots)`` of one plan and direction,
    as the simulator counts them (:func:`attnlang.simulate.pass_work`), weighted by pass share."""
    ws = pass_work(plan, target, direction, heads)
    return [sum(len(w.full) for w in ws),
            sum(float(w.qtiles.sum()) for w in ws),
            sum(float((w.full + w.partial + w.padding).sum()) * w.share for w in ws),
            sum(float(w.masked.sum()) * w.share for w in ws),
            sum(float(w.gathered.sum()) * w.share for w in ws)]


def calibrate_cpu(n: int = 4096, heads: int = 8, head_dim: int = 64, repeat: int = 3,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the torch backend here and return a ``cpu`` profile document.

    Raises AttnError (with the measurements) when they do not fit the model: a per-slot cost
    that is not positive, or a measurement that the fitted costs miss by more than
    ``MAX_RESIDUAL`` — what a busy machine produces.
    """
    try:
        import torch
    except ImportError:
        raise AttnError("calibrating the cpu target needs torch", hint="pip install torch") from None

    if "torch" not in BACKENDS:
        raise AttnError("calibration needs the 'torch' backend, which this installation lacks",
                        hint=f"available backends: {', '.join(BACKENDS)}")
    base = load_target(pathlib.Path(__file__).parent.parent / "targets" / "cpu.json")
    patterns = calibration_patterns(n)
    measured = time_patterns(patterns, heads, head_dim, repeat, progress=progress)
    measurements, feats = [], {"forward": [], "backward": []}
    times = {"forward": [], "backward": []}
    bm = bn = None
    for name, pattern in patterns.items():
        plan = make_plan(pattern)
        bm, bn = plan.block_m, plan.block_n
        f, b = measured[name]
        measurements.append({"pattern": name, "forward_s": f, "backward_s": b, "block_m": bm, "block_n": bn})
        for direction, t in (("forward", f), ("backward", b)):
            feats[direction].append(features(plan, base, direction, heads))
            times[direction].append(t)
    fits = {d: fit_costs(np.array(feats[d]), np.array(times[d])) for d in feats}
    _check_fit(fits, feats, times, list(patterns))
    callf, cf, tf, mf, gf = fits["forward"]
    callb, cb, tb, mb, gb = fits["backward"]
    tile_flops = 4.0 * bm * bn * head_dim
    return {
        "name": "cpu", "kind": "cpu",
        "description": f"this machine ({torch.get_num_threads()} threads), torch {torch.__version__} tile executor, fp32",
        "source": f"measured by `attnlang calibrate` on {datetime.date.today().isoformat()}",
        "units": 1, "cores": torch.get_num_threads(),
        "tflops": {"fp32": tile_flops / tf / 1e12},
        "bandwidth_gbs": _bandwidth_gbs(n, heads, head_dim), "head_dim": head_dim, "index_read_ns": 0.0,
        "forward": {"efficiency": 1.0, "tile_fixed_ns": 0.0, "mask_cost": mf / tf, "cta_overhead_ns": cf * 1e9,
                    "chunk_overhead_ns": callf * 1e9, "gather_cost": gf / tf},
        "backward": {"efficiency": 1.0, "flop_ratio": tb / tf, "tile_fixed_ns": 0.0, "mask_cost": mb / tb,
                     "cta_overhead_ns": cb * 1e9, "chunk_overhead_ns": callb * 1e9, "gather_cost": gb / tb},
        "executor": {"pad_rows": base.executor.pad_rows, "mask_whole_row": base.executor.mask_whole_row,
                     "backward": base.executor.backward, "chunk_bytes": CHUNK_BYTES},
        "calibration": {"n": n, "heads": heads, "head_dim": head_dim, "repeat": repeat,
                        "measurements": measurements,
                        "residuals": {d: _residuals(fits[d], feats[d], times[d]) for d in fits}},
    }


def _residuals(x: np.ndarray, feats: list, times: list) -> list[float]:
    """Relative misfit of each measurement: fitted / measured - 1."""
    fitted = np.array(feats) @ x
    return [float(f / t - 1) if t > 0 else float("inf") for f, t in zip(fitted, times)]


def _check_fit(fits: dict, feats: dict, times: dict, names: list[str]) -> None:
    """Refuse a fit that is nonsense, naming the measurements and what would help."""
    problems = []
    for d, x in fits.items():
        if x[SLOT] <= 0:
            problems.append(f"{d}: no positive per-tile cost fits (the sparse patterns are not cheaper "
                            "per tile than dense)")
            continue
        res = _residuals(x, feats[d], times[d])
        bad = [f"{n} {100 * r:+.0f}%" for n, r in zip(names, res) if abs(r) > MAX_RESIDUAL]
        if bad:
            problems.append(f"{d}: the fitted costs miss {', '.join(bad)} (more than "
                            f"{100 * MAX_RESIDUAL:.0f}%)")
    if problems:
        table = "; ".join(f"{n}: forward {1e3 * f:.1f} ms, backward {1e3 * b:.1f} ms"
                          for n, f, b in zip(names, times["forward"], times["backward"]))
        raise AttnError("calibration failed: the measurements do not fit time = calls * c0 + query tiles * c1 "
                        "+ slots * t + masked slots * t * mask_cost + gathered slots * t * gather_cost: " + "; ".join(problems) + f". Measured: {table}",
                        hint="timings on a busy machine measure the load; rerun when it is quiet "
                             "(`uptime`), with a larger --repeat or --n")
