"""What NaN/Inf isolation costs on the torch executor (docs/reliability.md).

    python bench/nonfinite.py            # causal & sliding(256), B=1, H=8, N=4096, D=64, fp32

Prints, in milliseconds (the best of ``--repeat`` runs, one thread): the forward with its
per-call finiteness check, the same forward with the check skipped, the check alone, and the
forward on the exact path taken when K holds NaN.
"""
from __future__ import annotations

import argparse
import time

import torch

import attnlang
from attnlang.runtime import nonfinite, torch_exec


def best(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fn = attnlang.compile(attnlang.causal & attnlang.sliding(256), tokens=args.n, backend="torch")
    q, k, v = (torch.randn(1, 8, args.n, 64) for _ in range(3))
    poisoned = k.clone()
    poisoned[:, :, -args.n // 4:] = float("nan")
    with torch.no_grad():
        checked = best(lambda: fn(q, k, v), args.repeat)
        check = best(lambda: nonfinite.all_finite(q, k, v), args.repeat)
        saved, torch_exec.all_finite = torch_exec.all_finite, lambda *t: True
        try:
            unchecked = best(lambda: fn(q, k, v), args.repeat)
        finally:
            torch_exec.all_finite = saved
        exact = best(lambda: fn(q, poisoned, v), max(1, args.repeat // 3))
    print(f"| N | forward (checked) | forward (no check) | check alone | exact path (NaN keys) |")
    print(f"| --- | --- | --- | --- | --- |")
    print(f"| {args.n} | {checked:.1f} | {unchecked:.1f} | {check:.2f} | {exact:.1f} |")


if __name__ == "__main__":
    main()
