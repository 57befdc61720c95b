"""CPU benchmarks: attnlang's torch executor vs compiled FlexAttention vs SDPA with a dense mask.

Two modes, one command each:

    python bench/cpu.py                       # causal & sliding(256) at N = 4096, 16384, 65536
    python bench/cpu.py --n 4096 --n 16384    # a subset
    python bench/cpu.py --examples            # every static examples/*.attn pattern (minutes)
    python bench/cpu.py --examples --quick    # the same, one timed run each, no SDPA backward
    python bench/cpu.py --examples --only swa --only na2d --set nat:K=9

Each prints a Markdown table (milliseconds, the median of ``--repeat`` timed runs after a
warm-up; the machine may be shared, so the load average is printed with the table). B=1, D=64,
fp32; H=8 unless the pattern declares its heads.

Window mode: plan time (attnlang ``make_plan`` vs FlexAttention ``create_block_mask``, eager and
compiled), forward, and forward+backward. FlexAttention's CPU path has no backward; SDPA with a
dense boolean mask is skipped where the mask (N² bytes) or its runtime would not fit.

Examples mode (``--examples``): every pattern of every ``examples/*.attn`` file at a size that fits
this machine (``EXAMPLE_SIZES``: smaller parameters for the patterns whose paper sizes do not;
``--set PATTERN:K=V`` overrides), skipping patterns that read Q/K (``route``/``pyramid``:
``bench/routed.py`` and ``bench/pyramid.py`` measure those). Patterns with runtime inputs get the
sample inputs of ``SAMPLE_INPUTS``. Columns: tile density, plan time (first call and warm),
forward and forward+backward of the ``torch`` backend, forward of the ``flex`` backend (the same
plan as a BlockMask, ``torch.compile(flex_attention)``), and SDPA with the pattern's dense mask,
forward and forward+backward, where the mask fits in ``--sdpa-mask-mib``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import time
import warnings

SDPA_MAX_N = 16384  # dense N x N mask: 256 MiB at 16384, 4 GiB (and minutes) at 65536
EAGER_MASK_MAX_N = 16384  # eager create_block_mask materialises ~11 bytes per (q, k)

CASES = {
    "causal": ("causal", lambda r: lambda b, h, q, k: k <= q),
    "window": ("causal & sliding(256)", lambda r: lambda b, h, q, k: (k <= q) & (q - k <= r)),
}


def median_ms(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` runs after one warm-up (which includes compilation)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def median_ms_interleaved(fns: dict[str, object], repeat: int) -> dict[str, float]:
    """Median times of several functions whose runs alternate, so load spikes hit them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def load() -> str:
    """The 1/5/15-minute load averages: how busy the (possibly shared) machine was."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


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
    row["plan attnlang"] = fmt(median_ms(lambda: attnlang.make_plan(expr, tokens=n), repeat))
    if n <= EAGER_MASK_MAX_N:
        row["plan flex eager"] = fmt(median_ms(lambda: create_block_mask(mod, 1, 1, n, n, device="cpu"), 1))
    else:
        row["plan flex eager"] = "skipped (N² memory)"
    cbm = torch.compile(create_block_mask)
    row["plan flex compiled"] = fmt(median_ms(lambda: cbm(mod, 1, 1, n, n, device="cpu"), repeat))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    fn = attnlang.compile(expr, tokens=n, backend="torch")
    bm = cbm(mod, 1, 1, n, n, device="cpu")
    flex = torch.compile(flex_attention)
    progress.set_postfix_str(f"{case} N={n}: forward")
    with torch.no_grad():
        fwd = median_ms_interleaved({"attnlang": lambda: fn(q, k, v),
                                   "flex": lambda: flex(q, k, v, block_mask=bm)}, repeat)
    row["fwd attnlang"], row["fwd flex compiled"] = fmt(fwd["attnlang"]), fmt(fwd["flex"])
    progress.set_postfix_str(f"{case} N={n}: forward+backward")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    row["fwd+bwd attnlang"] = fmt(median_ms(lambda: fn(qg, kg, vg).sum().backward(), repeat))
    row["fwd+bwd flex"] = "n/a (no CPU backward)"

    if n <= SDPA_MAX_N:
        progress.set_postfix_str(f"{case} N={n}: sdpa")
        idx = torch.arange(n)
        dense = mod(None, None, idx[:, None], idx[None, :])
        reps = max(1, repeat // 3)
        with torch.no_grad():
            sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), reps)
        row["fwd sdpa mask"] = fmt(sdpa)
        sdpa_fb = median_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).sum().backward(), reps)
        row["fwd+bwd sdpa mask"] = fmt(sdpa_fb)
        row["fwd speedup vs sdpa"] = f"{sdpa / float(row['fwd attnlang']):.1f}x"
        row["fwd+bwd speedup vs sdpa"] = f"{sdpa_fb / float(row['fwd+bwd attnlang']):.1f}x"
    else:
        for col in ("fwd sdpa mask", "fwd+bwd sdpa mask", "fwd speedup vs sdpa", "fwd+bwd speedup vs sdpa"):
            row[col] = "skipped (N² mask)"
    row["fwd vs flex"] = f"{float(row['fwd flex compiled']) / float(row['fwd attnlang']):.2f}x"
    return row


# --------------------------------------------------------------------------------------------
# Examples mode
# --------------------------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Patterns whose paper sizes do not fit a small CPU run, with parameters of the same kind that do
# (about 4k-10k tokens). Everything else runs at the size written in its file.
EXAMPLE_SIZES: dict[str, dict] = {
    "gna_flux": {"H": 96, "W": 96, "K": 32, "s": 8},
    "na3d": {"T": 8, "H": 24, "W": 40, "K": (4, 12, 12), "s": (2, 4, 4)},
    "na3d_causal": {"T": 8, "H": 24, "W": 40, "K": (4, 13, 13)},
    "frame_causal": {"T": 8, "H": 24, "W": 40},
}


def sample_inputs(pattern) -> dict:
    """Runtime inputs for one batch item: four uneven documents (ids), three quarters valid (length)."""
    import numpy as np

    out = {}
    n = pattern.n
    for inp in pattern.inputs:
        if inp.kind == "ids":
            cuts = [0, n // 8, n // 2, 5 * n // 8, n]
            out[inp.name] = np.repeat(np.arange(4), np.diff(cuts)).astype(np.int64)
        else:
            out[inp.name] = np.asarray(3 * n // 4, dtype=np.int64)
    return out


SAMPLE_INPUTS = sample_inputs  # documented name: how the patterns with runtime inputs are fed


def example_patterns(only: list[str] | None, sets: dict[str, dict]):
    """``(file stem, pattern)`` for every static example pattern at its benchmark size, and a
    list of ``(name, why skipped)``."""
    import attnlang

    out, skipped = [], []
    for path in sorted((ROOT / "examples").glob("*.attn")):
        module = attnlang.parse(path)
        for name in module.names:
            if only and name not in only and path.stem not in only:
                continue
            params = {**EXAMPLE_SIZES.get(name, {}), **sets.get(name, {})}
            p = module.instantiate(name, params)
            if p.reads_content:
                skipped.append((name, "reads Q/K (route/pyramid): bench/routed.py, bench/pyramid.py"))
                continue
            out.append((path.stem, p))
    return out, skipped


def bench_example(p, repeat: int, dim: int, sdpa_mib: int, quick: bool, progress) -> dict[str, str]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import attnlang
    import attnlang.runtime.flex as flex

    fmt = lambda x: f"{x:.1f}"  # noqa: E731
    heads = p.heads or 8
    inputs = sample_inputs(p) if p.inputs else None
    row: dict[str, str] = {"pattern": p.name, "tokens": "x".join(map(str, p.layout.sizes)), "N": str(p.n),
                           "H": str(heads)}
    say = lambda what: progress.set_postfix_str(f"{p.name} N={p.n}: {what}")  # noqa: E731
    say("plan")
    t = time.perf_counter()
    plan = attnlang.make_plan(p, inputs=inputs)
    row["plan first"] = fmt((time.perf_counter() - t) * 1e3)
    row["plan warm"] = fmt(median_ms(lambda: attnlang.make_plan(p, inputs=inputs), repeat))
    dense_tiles = plan.q_tiles * plan.kv_tiles * len(plan.groups)
    row["tile density"] = f"{sum(g.full.nnz + g.partial.nnz for g in plan.groups) / dense_tiles:.3f}"

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, p.n, dim, generator=gen) for _ in range(3))
    kw = {name: torch.as_tensor(x) for name, x in (inputs or {}).items()}
    fn = attnlang.compile(p, backend="torch")
    say("torch forward")
    with torch.no_grad():
        fwd = median_ms(lambda: fn(q, k, v, **kw), repeat)
    row["fwd torch"] = fmt(fwd)
    say("torch forward+backward")
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    fb = median_ms(lambda: fn(qg, kg, vg, **kw).sum().backward(), repeat)
    row["fwd+bwd torch"] = fmt(fb)

    say("flex forward (compiling)")
    torch._dynamo.reset()  # a fresh compile per pattern: no recompile limit, no N² eager fallback
    flex.COMPILE, flex._compiled = True, None
    try:
        ff = attnlang.compile(p, backend="flex")
        with torch.no_grad():
            row["fwd flex compiled"] = fmt(median_ms(lambda: ff(q, k, v, **kw, return_lse=False), repeat))
    except attnlang.AttnError as e:
        row["fwd flex compiled"] = f"n/a ({str(e).splitlines()[0][:60]})"
    finally:
        flex.COMPILE = None

    mask_heads = heads if len(plan.groups) > 1 else 1
    mib = mask_heads * p.n * p.n / 2**20
    if mib > sdpa_mib:
        for col in ("fwd sdpa mask", "fwd+bwd sdpa mask", "fwd vs sdpa", "fwd+bwd vs sdpa"):
            row[col] = f"skipped (mask {mib / 1024:.1f} GiB)"
        return row
    say("sdpa (dense mask)")
    dense = torch.from_numpy(np.ascontiguousarray(p.mask(heads=mask_heads, inputs=inputs)))
    reps = 1 if quick else max(1, repeat // 2)
    with torch.no_grad():
        sd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), reps)
    row["fwd sdpa mask"], row["fwd vs sdpa"] = fmt(sd), f"{sd / fwd:.1f}x"
    if quick:
        row["fwd+bwd sdpa mask"] = row["fwd+bwd vs sdpa"] = "(--quick)"
    else:
        sdb = median_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=dense).sum().backward(), reps)
        row["fwd+bwd sdpa mask"], row["fwd+bwd vs sdpa"] = fmt(sdb), f"{sdb / fb:.1f}x"
    return row


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``--set PATTERN:K=V`` (repeatable) -> ``{pattern: {K: V}}``; values in .attn syntax."""
    from attnlang.commands import parse_value

    out: dict[str, dict] = {}
    for item in items:
        name, _, kv = item.partition(":")
        key, sep, value = kv.partition("=")
        if not sep or not name or not key.isidentifier():
            raise SystemExit(f"--set {item!r} must look like PATTERN:K=V, e.g. --set nat:K=9")
        out.setdefault(name, {})[key] = parse_value(value)
    return out


def print_table(rows: list[dict[str, str]]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r.get(c, "") for c in cols) + " |")


def main_examples(args) -> None:
    import torch
    from tqdm import tqdm

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    repeat = 1 if args.quick else args.repeat
    pats, skipped = example_patterns(args.only, parse_sets(args.set))
    rows, before = [], load()
    with tqdm(pats, desc="examples", unit="pattern") as bar:
        for _, p in bar:
            rows.append(bench_example(p, repeat, args.dim, args.sdpa_mask_mib, args.quick, bar))
    print(f"\nMachine: {machine()}; B=1, D={args.dim}, fp32; times in ms (median of {repeat}); "
          f"load average before {before}, after {load()}\n")
    print_table(rows)
    for name, why in skipped:
        print(f"\nskipped {name}: {why}", end="")
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="sequence length (repeatable)")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="pattern (repeatable)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (the median is kept)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--examples", action="store_true", help="benchmark every static examples/*.attn pattern")
    ap.add_argument("--only", action="append", metavar="NAME", help="--examples: a pattern or file stem (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="PATTERN:K=V",
                    help="--examples: override a pattern parameter, e.g. --set swa:N=4096")
    ap.add_argument("--quick", action="store_true", help="--examples: one timed run each, no SDPA backward")
    ap.add_argument("--sdpa-mask-mib", type=int, default=512, metavar="MIB",
                    help="--examples: largest dense mask SDPA is run with (default 512 MiB)")
    args = ap.parse_args(argv)
    if args.examples:
        return main_examples(args)

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
    print(f"\nMachine: {machine()}; B=1, H={args.heads}, D={args.dim}, fp32; times in ms (median of {args.repeat}); load average {load()}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main()
