"""Benchmark: PSA pyramid(...) on the torch path against dense attention (CPU, fp32).

Prints one Markdown row per case: PSA forward and forward+backward against SDPA with the same
static constraint (``is_causal`` for causal among, none for full), and the share of the dense
(query, key) work PSA does (selected keys weighted by 1/level). Not a test.

    .venv/bin/python bench/pyramid.py            # B=1, H=8, D=64
"""
from __future__ import annotations

import time

import torch

import attnlang
from attnlang.pattern import Pattern, causal, full, pyramid

CASES = [  # (label, tokens, block, query block, levels, keep, among)
    ("1-D causal, N=4096", 4096, 64, 64, [1, 2, 4, 8], [0.15, 0.15, 0.2, 0.2], causal),
    ("1-D causal, N=8192", 8192, 64, 64, [1, 2, 4, 8], [0.15, 0.15, 0.2, 0.2], causal),
    ("3-D video 8x32x32, full", (8, 32, 32), (1, 8, 8), (1, 8, 8), [1, 2, 4, 8], [0.1, 0.1, 0.2, 0.2], full),
]


def timed(fn, reps: int = 3) -> float:
    fn()  # warm: plans, caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.manual_seed(0)
    print("| case | N | PSA fwd ms | SDPA fwd ms | speedup | PSA fwd+bwd ms | SDPA fwd+bwd ms | speedup | work |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, tokens, block, qblock, levels, keep, among in CASES:
        p = Pattern.create(pyramid(block, qblock, levels, keep, among), tokens)
        n = p.n
        q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
        fn = attnlang.compile(p, backend="torch")
        is_causal = among is causal
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # noqa: E731
        with torch.no_grad():
            f_psa, f_dense = timed(lambda: fn(q, k, v)), timed(sdpa)
        b_psa = timed(lambda: fn(q, k, v).sum().backward())
        b_dense = timed(lambda: sdpa().sum().backward())
        from attnlang.runtime.call import check_call
        from attnlang.runtime.pyramid import _static, levels as level_of

        call = check_call(p, q, k, v, None, {}, planner=None)
        t = level_of(call, 0)
        ksize = _static(p, "cpu").ksize_t
        gsize = _static(p, "cpu").qsize
        lv = t.clamp(min=1).float()
        keys = ((t > 0).float() * ksize[None, None, :] / lv).sum(-1)  # virtual keys per group
        work = float((keys * gsize[None, :]).sum() / (8 * n * n * (0.5 if is_causal else 1.0)))
        print(f"| {label} | {n} | {f_psa * 1e3:.1f} | {f_dense * 1e3:.1f} | {f_dense / f_psa:.2f}x | "
              f"{b_psa * 1e3:.1f} | {b_dense * 1e3:.1f} | {b_dense / b_psa:.2f}x | {work:.3f} |")


if __name__ == "__main__":
    main()
