"""Benchmark: PSA pyramid(...) on the torch path against dense attention (CPU, fp32).

Prints one Markdown row per case: PSA forward and forward+backward against SDPA with the same
static constraint (``is_causal`` for causal among, none for full), and the share of the dense
(query, key) work PSA does (selected keys weighted by 1/level). Every timing is the median of
``--reps`` runs after a warm-up, PSA and SDPA interleaved so load from other jobs hits both
alike. Not a test.

    .venv/bin/python bench/pyramid.py [--threads 1] [--reps 3] [--only video]   # B=1, H=8, D=64
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import attnlang
from attnlang.pattern import Pattern, causal, full, pyramid
from attnlang.runtime.call import check_call
from attnlang.runtime.pyramid import levels as level_of, static_of

CASES = [  # (label, tokens, block, query block, levels, keep, among)
    ("1-D causal, N=4096", 4096, 64, 64, [1, 2, 4, 8], [0.15, 0.15, 0.2, 0.2], causal),
    ("1-D causal, N=8192", 8192, 64, 64, [1, 2, 4, 8], [0.15, 0.15, 0.2, 0.2], causal),
    ("3-D video 8x32x32, full", (8, 32, 32), (1, 8, 8), (1, 8, 8), [1, 2, 4, 8], [0.1, 0.1, 0.2, 0.2], full),
]


def timed(runs: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, after one warm-up call each (plans, caches), interleaved."""
    times = {key: [] for key in runs}
    for f in runs.values():
        f()
    for _ in range(reps):
        for key, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None, help="substring of the case labels to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.1f}")
    print("| case | N | PSA fwd ms | SDPA fwd ms | speedup | PSA fwd+bwd ms | SDPA fwd+bwd ms | speedup | work |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, tokens, block, qblock, levels, keep, among in CASES:
        if args.only and args.only not in label:
            continue
        p = Pattern.create(pyramid(block, qblock, levels, keep, among), tokens)
        n = p.n
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
        fn = attnlang.compile(p, backend="torch")
        is_causal = among is causal
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # noqa: E731

        def no_grad(f):
            def g():
                with torch.no_grad():
                    f()
            return g

        ms = timed({"fwd": no_grad(lambda: fn(q, k, v)), "sdpa": no_grad(sdpa),
                    "fb": lambda: fn(q, k, v).sum().backward(), "sdpa_fb": lambda: sdpa().sum().backward()},
                   args.reps)
        call = check_call(p, q, k, v, None, {}, planner=None)
        t = level_of(call, 0)
        st = static_of(p, "cpu")
        lv = t.clamp(min=1).float()
        keys = ((t > 0).float() * st.ksize_t[None, None, :] / lv).sum(-1)  # virtual keys per group
        work = float((keys * st.qsize[None, :]).sum() / (8 * n * n * (0.5 if is_causal else 1.0)))
        print(f"| {label} | {n} | {ms['fwd'] * 1e3:.1f} | {ms['sdpa'] * 1e3:.1f} | {ms['sdpa'] / ms['fwd']:.2f}x | "
              f"{ms['fb'] * 1e3:.1f} | {ms['sdpa_fb'] * 1e3:.1f} | {ms['sdpa_fb'] / ms['fb']:.2f}x | {work:.3f} |",
              flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
