"""Routed families on CPU: the torch backend against dense SDPA and FlexAttention fed the same
selected blocks (BlockMask built from our per-call plan). Prints a Markdown table.

    .venv/bin/python bench/routed.py [--n 8192]

B=1, H=8, D=64, fp32. Times are forward only, median of 3 after a warm-up; "plan" is the
routing stage + per-head planning that every call pays (already inside "torch").
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnlang
from attnlang.runtime.call import check_call


def bench(fn, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def flex_from_plan(call):
    """A FlexAttention BlockMask of the call's selection: per-head partial/full tables."""
    from torch.nn.attention.flex_attention import BlockMask

    plan = call.plan(0)
    tabs = [g.partial.padded() for g in plan.groups], [g.full.padded() for g in plan.groups]
    def stack(ts):
        w = max(t[1].shape[1] for t in ts)
        num = torch.stack([torch.from_numpy(c) for c, _ in ts])[None]
        idx = torch.stack([torch.nn.functional.pad(torch.from_numpy(i), (0, w - i.shape[1])) for _, i in ts])[None]
        return num.int(), idx.int()
    pn, pi = stack(tabs[0])
    fn_, fi = stack(tabs[1])
    masks = torch.from_numpy(call.pattern.mask(heads=call.heads, content=call.content(0)))

    def mask_mod(b, h, q, k):
        return masks[h, q, k]
    return BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=(plan.block_m, plan.block_n), mask_mod=mask_mod,
                                    seq_lengths=(plan.n, plan.n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    n = args.n
    side = int(round((n // 16) ** 0.5))
    cases = [
        ("moba(size=512, top=3)", f"pattern p {{ tokens n[{n}]\n attend moba(size = 512, top = 3) }}"),
        ("pbs(128, 1024, 0.9)", f"pattern p {{ tokens n[{n}]\n attend pbs(size = 128, segment = 1024, tau = 0.9) }}"),
        ("vmoba 3-D (2, 4, 8)", f"pattern p {{ tokens t[16], h[{side}], w[{n // 16 // side}]\n attend vmoba((2, 4, 8), 0.25) }}"),
        ("biformer(region=4, top=8)", f"pattern p {{ tokens h[{side * 4}], w[{n // side // 4}]\n attend biformer(region = 4, top = 8) }}"),
    ]
    torch.manual_seed(0)
    print(f"| family (N = {n}) | density | torch (ms) | of which plan (ms) | SDPA dense (ms) | flex, same blocks (ms) |")
    print("|---|---|---|---|---|---|")
    for name, src in cases:
        p = attnlang.parse(src).instantiate("p")
        q, k, v = (torch.randn(1, 8, p.n, 64) for _ in range(3))
        fn = attnlang.compile(p, backend="torch")
        t_torch = bench(lambda: fn(q, k, v))
        call = check_call(p, q, k, v, None, {}, None)
        t_plan = bench(lambda: check_call(p, q, k, v, None, {}, None).plan(0), reps=1)
        dense = torch.nn.functional.scaled_dot_product_attention
        t_sdpa = bench(lambda: dense(q, k, v))
        stats = [call.plan(0).stats(h) for h in range(8)]
        density = sum(s["visited"] for s in stats) / sum(s["q_tiles"] * s["kv_tiles"] for s in stats)
        try:
            from torch.nn.attention.flex_attention import flex_attention
            bm = flex_from_plan(call)
            cf = torch.compile(flex_attention)
            t_flex = f"{bench(lambda: cf(q, k, v, block_mask=bm)):.1f}"
        except Exception as e:  # noqa: BLE001 - report, do not hide
            t_flex = f"n/a ({type(e).__name__})"
        print(f"| {name} | {density:.3f} (tiles) | {t_torch:.1f} | {t_plan:.1f} | {t_sdpa:.1f} | {t_flex} |")


if __name__ == "__main__":
    main()
