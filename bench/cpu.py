"""CPU benchmark: attnlang's torch executor vs compiled FlexAttention vs SDPA with a dense mask.

    python bench/cpu.py                       # N in 4096, 16384, 65536 (slow: minutes)
    python bench/cpu.py --n 4096 --n 16384    # a subset
    python bench/cpu.py --case causal --repeat 5

Prints a Markdown table (milliseconds, best of ``--repeat`` runs after a warm-up; the machine may
be shared, so the best run is the least disturbed one). B=1, H=8, D=64, fp32 by default.
Columns: plan time (attnlang ``make_plan`` vs FlexAttention ``create_block_mask``, eager and
compiled), forward, and forward+backward. FlexAttention's CPU path has no backward; SDPA with a
dense boolean mask is skipped where the mask (N² bytes) or its runtime would not fit.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time
import warnings

SDPA_MAX_N = 16384  # dense N x N mask: 256 MiB at 16384, 4 GiB (and minutes) at 65536
EAGER_MASK_MAX_N = 16384  # eager create_block_mask materialises ~11 bytes per (q, k)

CASES = {
    "causal": ("causal", lambda r: lambda b, h, q, k: k <= q),
    "window": ("causal & sliding(256)", lambda r: lambda b, h, q, k: (k <= q) & (q - k <= r)),
}


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def best_ms_interleaved(fns: dict[str, object], repeat: int) -> dict[str, float]:
    """Best times of several functions whose runs alternate, so load spikes hit them alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: b * 1e3 for name, b in best.items()}


def machine() -> str:
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def bench_case(case: str, n: int, repeat: int, heads: int, dim: int, progress) -> dict[str, str]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attnlang
    from attnlang import causal, sliding

    expr = causal if case == "causal" else causal & sliding(256)
    mod = CASES[case][1](256)
    row: dict[str, str] = {"case": CASES[case][0], "N": str(n)}
    fmt = lambda x: f"{x:.1f}"  # noqa: E731

    progress.set_postfix_str(f"{case} N={n}: plan")
    row["plan attnlang"] = fmt(best_ms(lambda: attnlang.make_plan(expr, tokens=n), repeat))
    if n <= EAGER_MASK_MAX_N:
        row["plan flex eager"] = fmt(best_ms(lambda: create_block_mask(mod, 1, 1, n, n, device="cpu"), 1))
    else:
        row["plan flex eager"] = "skipped (N² memory)"
    cbm = torch.compile(create_block_mask)
    row["plan flex compiled"] = fmt(best_ms(lambda: cbm(mod, 1, 1, n, n, device="cpu"), repeat))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    fn = attnlang.compile(expr, tokens=n, backend="torch")
    bm = cbm(mod, 1, 1, n, n, device="cpu")
    flex = torch.compile(flex_attention)
    progress.set_postfix_str(f"{case} N={n}: forward")
    with torch.no_grad():
        fwd = best_ms_interleaved({"attnlang": lambda: fn(q, k, v),
                                   "flex": lambda: flex(q, k, v, block_mask=bm)}, repeat)
    row["fwd attnlang"], row["fwd flex compiled"] = fmt(fwd["attnlang"]), fmt(fwd["flex"])
    progress.set_postfix_str(f"{case} N={n}: forward+backward")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    row["fwd+bwd attnlang"] = fmt(best_ms(lambda: fn(qg, kg, vg).sum().backward(), repeat))
    row["fwd+bwd flex"] = "n/a (no CPU backward)"

    if n <= SDPA_MAX_N:
        progress.set_postfix_str(f"{case} N={n}: sdpa")
        idx = torch.arange(n)
        dense = mod(None, None, idx[:, None], idx[None, :])
        reps = max(1, repeat // 3)
        with torch.no_grad():
            sdpa = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), reps)
        row["fwd sdpa mask"] = fmt(sdpa)
        sdpa_fb = best_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).sum().backward(), reps)
        row["fwd+bwd sdpa mask"] = fmt(sdpa_fb)
        row["fwd speedup vs sdpa"] = f"{sdpa / float(row['fwd attnlang']):.1f}x"
        row["fwd+bwd speedup vs sdpa"] = f"{sdpa_fb / float(row['fwd+bwd attnlang']):.1f}x"
    else:
        for col in ("fwd sdpa mask", "fwd+bwd sdpa mask", "fwd speedup vs sdpa", "fwd+bwd speedup vs sdpa"):
            row[col] = "skipped (N² mask)"
    row["fwd vs flex"] = f"{float(row['fwd flex compiled']) / float(row['fwd attnlang']):.2f}x"
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="sequence length (repeatable)")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="pattern (repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is kept)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    jobs = [(c, n) for c in (args.case or ["window"]) for n in (args.n or [4096, 16384, 65536])]
    rows = []
    with tqdm(jobs, desc="bench", unit="case") as bar:
        for case, n in bar:
            rows.append(bench_case(case, n, args.repeat, args.heads, args.dim, bar))
    cols = list(rows[0])
    print(f"\nMachine: {machine()}; B=1, H={args.heads}, D={args.dim}, fp32; times in ms (best of {args.repeat})\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main()
