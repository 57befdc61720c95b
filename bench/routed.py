"""Routed families on CPU: attnlang's torch backend against dense SDPA and FlexAttention fed the
same selected blocks. Prints a Markdown table.

    .venv/bin/python bench/routed.py --n 4096 --n 16384 [--threads 1] [--reps 3] [--no-flex]

B=1, H=8, D=64, fp32, random Q/K/V (seed 0). Every timing is the median of ``--reps`` runs after
a warm-up, interleaved per family (attnlang, SDPA, flex) so load from other jobs hits all alike.
"attnlang" is a whole call: routing stage, tiles, attention, merge. "selected" is the fraction of
(query, key) pairs the pattern allows (what a perfect sparse kernel would compute) over N²;
SDPA computes all of them. Flex gets a BlockMask with the per-call plan's tile tables (per head)
and a ``mask_mod`` that reads the same selection, and runs ``torch.compile(flex_attention)``
(forward only: its CPU path has no backward).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import attnlang
from attnlang.routing import block_ids, group_ids
from attnlang.runtime import routed
from attnlang.runtime.call import check_call


def cases(n: int):
    side = int(round((n // 16) ** 0.5))
    return [
        ("moba(size=512, top=3)", f"tokens n[{n}]\n attend moba(size = 512, top = 3)"),
        ("pbs(128, 1024, 0.9)", f"tokens n[{n}]\n attend pbs(size = 128, segment = 1024, tau = 0.9)"),
        (f"vmoba (2, 4, 8) on 16x{side}x{n // 16 // side}",
         f"tokens t[16], h[{side}], w[{n // 16 // side}]\n attend vmoba((2, 4, 8), 0.25)"),
        (f"biformer(region=4, top=8) on {side * 4}x{n // side // 4}",
         f"tokens h[{side * 4}], w[{n // side // 4}]\n attend biformer(region = 4, top = 8)"),
    ]


def selected(call, sp) -> float:
    """Allowed (query, key) pairs over H * N², from the call's tiles and their masks (exact)."""
    total = 0
    sink_q, sink_k = call.q[..., 0].numel(), call.k[..., 0].numel()
    for tl in routed.tiles(call, sp):
        for c0, c1 in tl.chunks():
            rows = (tl.q_rows[c0 * tl.block_m:c1 * tl.block_m] != sink_q).view(c1 - c0, tl.block_m, 1)
            ok = rows & (tl.key_rows(c0, c1) != sink_k).view(c1 - c0, 1, -1)
            bias = tl.bias(c0, c1)
            total += int((ok if bias is None else ok & torch.isfinite(bias[0])).sum())
    return total / (call.heads * call.pattern.n ** 2)


def flex_block_mask(call, sp):
    """FlexAttention BlockMask of the call's selection: the per-call plan's per-head tables and
    ``base | (selected & extra)`` as the mask_mod (the split is exact)."""
    from torch.nn.attention.flex_attention import BlockMask

    from attnlang.runtime.flex import predicate

    plan, lay, r = call.plan(0), call.pattern.layout, sp.route
    n, H = plan.n, call.heads
    rows, width = -(-n // plan.block_m), -(-n // plan.block_n)

    def tables(kind):
        num = np.zeros((1, H, rows), dtype=np.int32)
        idx = np.zeros((1, H, rows, width), dtype=np.int32)
        for h, g in enumerate(plan.groups):
            c, i = getattr(g, kind).padded()
            num[0, h, :len(c)] = c
            idx[0, h, :i.shape[0], :i.shape[1]] = i
        return torch.from_numpy(num), torch.from_numpy(idx)

    content = call.content(0)
    sel = torch.from_numpy(content[r])
    gid = torch.from_numpy(group_ids(r, lay))
    kblock = torch.from_numpy(np.broadcast_to(block_ids(r, lay), (H, n)).copy() if r.permute is None
                              else content[(r, "pos")] // r.block[0])
    base, extra = predicate(sp.base, lay, {}, "cpu"), predicate(sp.extra, lay, {}, "cpu")

    def mask_mod(b, h, q, k):
        return base(b, q, k) | (sel[h, gid[q], kblock[h, k]] & extra(b, q, k))

    (pn, pi), (fn_, fi) = tables("partial"), tables("full")
    return BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=(plan.block_m, plan.block_n), mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--only", default=None, help="substring of the family names to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.1f}")
    print("| family | N | selected | fwd attnlang | fwd SDPA dense | fwd vs SDPA | fwd+bwd attnlang | "
          "fwd+bwd SDPA | fwd flex (same blocks) |")
    print("|---|---|---|---|---|---|---|---|---|")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for n in args.n or [4096]:
        for name, body in cases(n):
            if args.only and args.only not in name:
                continue
            p = attnlang.parse(f"pattern p {{ {body} }}").instantiate("p")
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, 8, p.n, 64) for _ in range(3))
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            fn = attnlang.compile(p, backend="torch")
            call = check_call(p, q, k, v, None, {}, None)
            sp = routed.split(p)
            runs = {
                "fwd": lambda: fn(q, k, v),
                "sdpa": lambda: sdpa(q, k, v),
                "fb": lambda: fn(qg, kg, vg).sum().backward(),
                "sdpa_fb": lambda: sdpa(qg, kg, vg).sum().backward(),
            }
            flex_error = "n/a"
            if not args.no_flex:
                try:
                    from torch.nn.attention.flex_attention import flex_attention

                    bmask = flex_block_mask(call, sp)
                    # Static shapes: after the first family, dynamo would otherwise recompile with
                    # dynamic shapes, and inductor fails on PBS's mask_mod then (not on its own).
                    cf = torch.compile(flex_attention, dynamic=False)
                    cf(q, k, v, block_mask=bmask)  # compile here: inductor may fail on the mask_mod
                    runs["flex"] = lambda: cf(q, k, v, block_mask=bmask)
                except Exception as e:  # noqa: BLE001 - report, do not hide
                    flex_error = f"n/a ({type(e).__name__})"
            times = {key: [] for key in runs}
            for f in runs.values():
                f()  # warm-up (and compilation)
            for _ in range(args.reps):
                for key, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[key].append(time.perf_counter() - t)
            ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            flex = f"{ms['flex']:.0f}" if "flex" in ms else flex_error
            print(f"| {name} | {n} | {selected(call, sp):.3f} | {ms['fwd']:.0f} | {ms['sdpa']:.0f} | "
                  f"{ms['sdpa'] / ms['fwd']:.2f}x | {ms['fb']:.0f} | {ms['sdpa_fb']:.0f} | {flex} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
