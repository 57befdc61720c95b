"""Planning benchmark: attnlang's make_plan against FlexAttention's create_block_mask.

Pattern: causal & sliding(256), B = 1, H = 1, block 64 (attnlang) / 128 (FlexAttention default).
Prints a Markdown table of median wall times (``make_plan first`` is the first plan of a
shape, which also derives its sympy closed form; later plans reuse it). Run: ``python bench/plan.py [--max-n 65536]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

from attnlang import Pattern, causal, sliding
from attnlang.planner import make_plan

R = 256


def _time(fn, reps: int) -> float:
    fn()  # warm (imports, compilation)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & (q - k <= R)

    compiled = torch.compile(create_block_mask)
    rows = []
    for n in args.sizes + [1 << 20]:
        p = Pattern.create(causal & sliding(R), tokens=n)
        t = time.perf_counter()
        make_plan(p)  # first plan of this shape: derives and caches the sympy closed form
        first = time.perf_counter() - t
        ours = _time(lambda: make_plan(p), args.reps)
        if n > max(args.sizes):
            rows.append((n, first, ours, None, None))
            continue
        eager = _time(lambda: create_block_mask(mask_mod, 1, 1, n, n, device="cpu"), args.reps) \
            if n <= 16384 else None  # eager materialises N x N
        comp = _time(lambda: compiled(mask_mod, 1, 1, n, n, device="cpu"), args.reps)
        rows.append((n, first, ours, eager, comp))
    print("| N | make_plan first | make_plan | create_block_mask eager | create_block_mask compiled "
          "| speedup vs compiled |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    ms = lambda s: "—" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    for n, first, ours, eager, comp in rows:
        sp = "—" if comp is None else f"{comp / ours:.0f}x ({comp / first:.0f}x first)"
        print(f"| {n} | {ms(first)} | {ms(ours)} | {ms(eager)} | {ms(comp)} | {sp} |")


if __name__ == "__main__":
    main()
