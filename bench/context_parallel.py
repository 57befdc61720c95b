"""Context parallelism benchmark: balance, bytes moved, and CPU wall time (gloo).

    python bench/context_parallel.py                 # balance + communication (no processes)
    python bench/context_parallel.py --wall          # also 4 gloo processes vs one, fwd + bwd
    python bench/context_parallel.py --wall --n 8192 --world 4 --reps 2

* **balance** — ``shard`` at N = 65536 on 4 (and 8) ranks: work max / mean for causal, a sliding
  window, packed documents of random lengths (seeded) and a 2-D neighborhood; the issue's bar is
  1.05.
* **communication** — ``causal & sliding(4096)`` at N = 2^20 on 8 simulated ranks: the largest
  rank's forward K/V receive against a K/V all-gather (bar: 1/4); dense causal at N = 65536 on 8
  ranks against ring attention (every rank receives every other rank's K/V forward; the
  backward ring moves K/V and dK/dV again, twice the forward).
* **wall** — ``causal & sliding(N/8)`` and ``causal`` at one total N: single process (torch
  backend) against ``ContextParallel`` over ``--world`` gloo processes, forward + backward, one
  torch thread per process, median of ``--reps`` after a warm-up. The machine has 2 cores:
  more than 2 processes cannot run at once, so this measures overheads, not scaling.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import numpy as np

from attnlang import Pattern, causal, make_plan, neighborhood, same, sliding
from attnlang.distributed import shard


def _packed(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(256, 8192, n // 256)
    doc = np.repeat(np.arange(len(lengths)), lengths)[:n]
    p = Pattern.create(causal & same("doc"), tokens=n, inputs={"doc": "ids"})
    return make_plan(p, inputs={"doc": doc})


def balance(n: int = 65536) -> None:
    cases = [
        ("causal", make_plan(causal, tokens=n)),
        ("causal & sliding(4096)", make_plan(causal & sliding(4096), tokens=n)),
        ("sliding(2048) (bidirectional)", make_plan(sliding(2048), tokens=n)),
        ("packed documents (random lengths 256..8192)", _packed(n)),
        ("2-D neighborhood 256 x 256, window 17 x 17", make_plan(neighborhood(window=(17, 17)), tokens=(256, 256))),
    ]
    print(f"### Balance, N = {n}\n")
    print("| pattern | ranks | layout | work max / mean | largest fwd receive / K/V all-gather |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, plan in cases:
        for r in (4, 8):
            t = time.perf_counter()
            sh = shard(plan, r)
            dt = time.perf_counter() - t
            b = sh.bytes_moved(1)
            how = "contiguous" if sh.segments_per_rank == 1 else f"{sh.segments_per_rank} segments (snake)"
            print(f"| {name} | {r} | {how}, {dt * 1e3:.0f} ms | {sh.imbalance:.3f} | "
                  f"{b['forward'].max() / b['all_gather'].max():.3f} |")
    print()


def communication() -> None:
    print("### Communication\n")
    n = 1 << 20
    t = time.perf_counter()
    plan = make_plan(causal & sliding(4096), tokens=n)
    sh = shard(plan, 8)
    dt = time.perf_counter() - t
    b = sh.bytes_moved(1)
    print(f"* `causal & sliding(4096)`, N = 2^20, 8 ranks (plan + shard {dt:.2f} s): largest forward "
          f"receive {b['forward'].max()} tokens of K/V = {b['forward'].max() / b['all_gather'].max():.4f} "
          f"of a K/V all-gather ({b['all_gather'].max()} tokens); all ranks together "
          f"{b['forward'].sum() / b['all_gather'].sum():.4f}; backward (dK/dV) the same token count.")
    n = 65536
    sh = shard(make_plan(causal, tokens=n), 8)
    b = sh.bytes_moved(1)
    ring_fwd = n * 7 // 8  # every rank receives the 7 other blocks
    print(f"* dense `causal`, N = 65536, 8 ranks ({sh.describe()}): forward receive per rank "
          f"max {b['forward'].max()} / mean {b['forward'].mean():.0f} tokens, ring attention "
          f"{ring_fwd} ({b['forward'].max() / ring_fwd:.3f} and {b['forward'].mean() / ring_fwd:.3f} of ring); "
          f"forward + backward max {2 * b['forward'].max()} vs ring {2 * ring_fwd * 2} "
          f"(ring re-sends K/V in the backward besides dK/dV)")
    from attnlang import parse
    from attnlang.simulate import sample_content

    moba = parse("pattern m { tokens n[32768]\n attend moba(size = 512, top = 3) }").instantiate("m", {})
    plan = make_plan(moba, content=sample_content(moba, 1, 64))
    sh = shard(plan, 4, unit=512, routed=True)
    b = sh.bytes_moved(1)
    print(f"* MoBA (block 512, top 3), N = 32768, 4 ranks, one head of seeded Gaussian Q/K "
          f"({sh.describe()}): largest forward receive {b['forward'].max() / b['all_gather'].max():.3f} "
          f"of a K/V all-gather: each token routes on its own, so a 64-query tile reads the union of "
          f"its queries' blocks")
    print()


# --------------------------------------------------------------------------------------------
# wall time with processes
# --------------------------------------------------------------------------------------------

def _specs(n: int):
    return [("causal & sliding(N/8)", causal & sliding(n // 8)), ("causal", causal)]


def _step_single(fn, q, k, v, dy):
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(qs, ks, vs)
    (out * dy).sum().backward()


def _worker(rank, world, port, n, reps, out_path):
    import torch
    import torch.distributed as dist

    from attnlang.distributed import ContextParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    lines = []
    for name, expr in _specs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v, dy = (torch.randn(1, 8, n, 64, generator=g) for _ in range(4))
        cp = ContextParallel(expr, tokens=n)
        ql, kl, vl = cp.shard(q), cp.shard(k), cp.shard(v)
        dyl = cp.shard(dy)
        times = []
        for i in range(reps + 1):
            a, b_, c = (t.clone().requires_grad_() for t in (ql, kl, vl))
            dist.barrier()
            t0 = time.perf_counter()
            (cp(a, b_, c) * dyl).sum().backward()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i:
                times.append(float(dt))
        lines.append(f"{name}\t{statistics.median(times)}\t{cp.stats['forward_bytes']}")
    if rank == 0:
        with open(out_path, "w") as f:
            f.write("\n".join(lines))
    dist.destroy_process_group()


def wall(n: int, world: int, reps: int) -> None:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    import attnlang

    torch.set_num_threads(1)
    single = {}
    for name, expr in _specs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v, dy = (torch.randn(1, 8, n, 64, generator=g) for _ in range(4))
        fn = attnlang.compile(expr, tokens=n, backend="torch")
        _step_single(fn, q, k, v, dy)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _step_single(fn, q, k, v, dy)
            ts.append(time.perf_counter() - t0)
        single[name] = statistics.median(ts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.txt")
        mp.start_processes(_worker, args=(world, port, n, reps, path), nprocs=world, join=True, start_method="spawn")
        rows = [line.split("\t") for line in open(path).read().splitlines()]
    print(f"### Wall time, CPU, N = {n}, B = 1, H = 8, D = 64, fp32, fwd + bwd, "
          f"{os.cpu_count()} cores, one torch thread per process\n")
    print(f"| pattern | one process | {world} gloo processes (slowest rank) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, t, _ in rows:
        t = float(t)
        print(f"| {name} | {single[name] * 1e3:.0f} ms | {t * 1e3:.0f} ms | {single[name] / t:.2f}x |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wall", action="store_true", help="also time gloo processes against one process")
    ap.add_argument("--only-wall", action="store_true", help="only the wall-time part")
    ap.add_argument("--n", type=int, default=16384, help="total N of the wall-time part")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not args.only_wall:
        balance()
        communication()
    if args.wall or args.only_wall:
        wall(args.n, args.world, args.reps)


if __name__ == "__main__":
    sys.exit(main())
