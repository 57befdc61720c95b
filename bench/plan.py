"""Planning benchmark: attnlang's make_plan against FlexAttention's create_block_mask.

Pattern: causal & sliding(256), B = 1, H = 1, block 64 (attnlang) / 128 (FlexAttention default).
Prints a Markdown table of median wall times (``make_plan first`` is the first plan of a
shape, which also derives its sympy closed form; later plans reuse it). Run: ``python bench/plan.py [--max-n 65536]``.

``python bench/plan.py --scale`` instead prints planning time and peak traced memory
(``tracemalloc``, numpy included) at scale: causal at N = 2^20 and 2^22 (range rows, O(query
tiles)), STA and a radial-style union of three neighborhoods at 64x128x128 (rule-decided
unions, box search), and MoBA's routed plan at growing N (linear in the selected tiles).
"""
from __future__ import annotations

import argparse
import statistics
import time

from attnlang import Pattern, causal, neighborhood, sliding
from attnlang.planner import make_plan


def sta():
    """Sliding tile attention (Zhang et al. 2025) on a 64x128x128 latent: tiles (6, 8, 8), a
    window of 3x3x3 tiles."""
    return Pattern.create(neighborhood(window=(18, 24, 24), stride=(6, 8, 8)), tokens=(64, 128, 128))


def radial():
    """A radial-style union of three neighborhoods (Radial Attention: the spatial reach shrinks
    as the temporal distance grows) at 64x128x128."""
    return Pattern.create(neighborhood(window=(3, 33, 33))
                          | neighborhood(window=(9, 17, 17), dilation=(1, 2, 2))
                          | neighborhood(window=(27, 9, 9), dilation=(1, 4, 4)), tokens=(64, 128, 128))


def _measure(fn):
    import tracemalloc

    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def scale() -> None:
    from attnlang.api import resolve
    from attnlang.routing import pattern_content

    import numpy as np

    print("| plan | visited tiles | stored | tile bound | FLOP bound | time | peak traced memory |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    cases = [(f"causal, N = 2^{e}", lambda e=e: make_plan(Pattern.create(causal, tokens=1 << e))) for e in (20, 22)]
    cases += [("STA 64x128x128", lambda: make_plan(sta())), ("radial 64x128x128", lambda: make_plan(radial()))]
    for name, fn in cases:
        plan, dt, peak = _measure(fn)
        s = plan.stats()
        g = plan.groups[0]
        stored = "ranges" if g.full.ranges is not None and not g.full.materialised else "tile lists"
        flop = f"{s['flop_bound']:.1f}x" if "flop_bound" in s else "—"
        print(f"| {name} | {s['visited']:,} | {stored} | {s['tile_bound']:.1f}x | "
              f"{flop} | {dt:.2f} s | {peak / 2**20:.0f} MiB |")
    rng = np.random.default_rng(0)
    for n in (32768, 65536, 131072):
        p = resolve("examples/moba.attn", N=n)
        q, k = (rng.standard_normal((1, n, 64)).astype(np.float32) for _ in range(2))
        content = pattern_content(p, q, k)
        plan, dt, peak = _measure(lambda: make_plan(p, content=content))
        s = plan.stats()
        print(f"| MoBA routed plan, N = {n} (content given) | {s['visited']:,} | tile lists | "
              f"{s['tile_bound']:.1f}x | — | {dt:.2f} s | {peak / 2**20:.0f} MiB |")

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
    ap.add_argument("--scale", action="store_true", help="planning time and memory at scale instead")
    args = ap.parse_args()
    if args.scale:
        scale()
        return

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
