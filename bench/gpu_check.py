"""One GPU check: correctness of every example and random patterns, then a speed table.

Run it first whenever a GPU is available (one H100/H200, under 8 minutes)::

    python bench/gpu_check.py --out gpu_check_out          # full check, 400 s budget
    python bench/gpu_check.py --quick --out gpu_check_out  # 5 examples, 2 random patterns
    TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke   # here, on CPU: same code path

Phase 1 (correctness), for every pattern of ``examples/*.attn`` and a few random patterns: the
generated kernel (``backend="triton"``) in bf16 and fp16, forward (out, lse) and backward (dq,
dk, dv), against the fp32 ``reference`` backend (dense; the fp32 ``torch`` tile executor where
``H * N^2`` is too large for a dense oracle). Error = max |got - want| / max(1, max |want|) per
tensor; tolerances in ``TOL`` (bf16 4e-2 out/lse, 8e-2 grads; fp16 1e-2 / 2e-2). B = 1, H = 2
(or the pattern's ``heads``), D = 64. The largest examples are shrunk for this phase (``SHRINK``,
and the table says so); the speed phase runs them at paper size.

Phase 2 (speed), per static example at paper size (bf16, D = 128, H = 16 unless the pattern
fixes ``heads``): median ms of the generated kernel, compiled FlexAttention on the same
``BlockMask`` (``attnlang.to_block_mask``) and dense SDPA on the flash backend, forward and
forward + backward; TFLOP/s counted on the visited tiles (``4 * H * visited * block_m * block_n
* D``, x3.5 with backward; dense counts ``N^2``), and the simulator's predicted time for the
device (``h200`` if the name says H200, else ``h100``/``a100``/``b200`` by capability). Routed
and pyramid patterns are timed end to end per call; runtime-input patterns are checked, not timed.

A global time budget (``--budget``, default 400 s) splits into the two phases (half each) and
per-case shares; a case over its share stops its remaining steps, and cases past the budget are skipped with a note. One
failing case records its error in the table and the run goes on. Writes ``check.md`` and
``check.json`` under ``--out`` and prints the Markdown.

The device machine has torch and Triton but not ``lark`` (attnlang's parser). Carry it as a wheel
(from this repository's root, on a machine with pip and network)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl lark==1.3.1
    # and optionally hypothesis (random patterns; without it they come from attnlang's builders)

then, on the device (the ``.whl`` folder carried with the working tree)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/gpu_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
import traceback
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# max |got - want| / max(1, max |want|): (forward out/lse, gradients), per dtype.
TOL = {"bfloat16": (4e-2, 8e-2), "float16": (1e-2, 2e-2), "float32": (1e-4, 1e-4)}
# Above this many score elements (H * N^2) the fp32 oracle is the torch tile executor, not the dense reference.
DENSE_LIMIT = 2 ** 28
# Correctness-phase sizes for examples too big for a quick check (the speed phase uses paper size).
SHRINK = {
    "gna_flux": {"H": 128, "W": 128},
    "na3d": {"H": 24, "W": 40},
    "na3d_causal": {"T": 8},
    "frame_causal": {"T": 6},
    "moba_32k": {"N": 8192},
    "pbs_32k": {"N": 8192},
    "vmoba_video": {"T": 4},
    "psa_video": {"T": 7},
}
QUICK = ("swa", "nat", "bigbird", "longformer", "moba_32k")
SMOKE = [  # (example file, pattern, parameters): tiny, so the interpreter runs them in seconds
    ("swa.attn", "swa", {"N": 192, "W": 48}),
    ("na2d.attn", "nat", {"H": 8, "W": 16, "K": 5}),
    ("padding.attn", "padding", {"N": 96}),  # a runtime input (checked, not timed)
]


def _need():
    """torch (and CUDA unless smoke-testing) and lark, or a clear message and exit 2."""
    try:
        import lark  # noqa: F401
    except ImportError:
        sys.exit("bench/gpu_check.py: `lark` (attnlang's parser) is not installed. On the device machine "
                 "carry it as a wheel: see the top of bench/gpu_check.py or docs/benchmarks.md "
                 "('GPU check'). Nothing was checked.")
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu_check.py needs torch (and triton); nothing was checked.")
    return torch


def _target(torch, dev) -> str:
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    if "h200" in name:
        return "h200"
    major, _ = torch.cuda.get_device_capability()
    return "b200" if major >= 10 else "h100" if major == 9 else "a100"


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class Budget:
    """Wall-clock deadlines: the whole run, and the share of the current case."""

    def __init__(self, total: float):
        self.start, self.total = time.monotonic(), total
        self.case_end = math.inf

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def begin_case(self, phase_end: float, cases_left: int) -> bool:
        """Start a case with an equal share of what is left of its phase; False: out of time."""
        now = time.monotonic() - self.start
        if now >= phase_end:
            return False
        self.case_end = time.monotonic() + max(5.0, (phase_end - now) / max(1, cases_left))
        return True

    def case_over(self) -> bool:
        return time.monotonic() > self.case_end or self.left() <= 0


# ---------------------------------------------------------------------------------------------
# cases

def example_cases(only, quick):
    """(label, Pattern at paper size, Pattern for correctness, shrink note) for every example."""
    import attnlang

    out = []
    for path in sorted((ROOT / "examples").glob("*.attn")):
        for name in attnlang.parse(path).names:
            if only and name not in only and path.stem not in only:
                continue
            if quick and not only and name not in QUICK:
                continue
            label = f"{path.name}:{name}"
            try:
                paper = attnlang.resolve(path, name)
            except Exception as e:
                out.append((label, None, None, _err(e)))
                continue
            small, note = paper, ""
            if name in SHRINK:
                try:
                    small = attnlang.resolve(path, name, **SHRINK[name])
                    note = "shrunk " + ",".join(f"{k}={v}" for k, v in SHRINK[name].items())
                except Exception as e:
                    note = f"not shrunk ({_err(e)})"
            out.append((label, paper, small, note))
    return out


def random_cases(count: int, seed: int, max_n: int):
    """``count`` random patterns: tests/strategies.py under hypothesis when it is installed (seeded),
    else attnlang's own builders with a seeded RNG."""
    pats = []
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import seed as hseed

        sys.path.insert(0, str(ROOT / "tests"))
        from strategies import patterns

        @hseed(seed)
        @settings(max_examples=20 * count, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(patterns(max_n=max_n))
        def draw(p):
            if len(pats) < count and p.n >= 32:  # hypothesis starts small: skip trivial sizes
                pats.append(p)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draw()
        source = "hypothesis"
    except ImportError:
        import attnlang as A

        rng = random.Random(seed)
        for _ in range(count):
            n = rng.randint(64, max_n)
            w = rng.randint(1, n // 2)
            expr = rng.choice([
                A.causal & A.sliding(w),
                A.window(w, rng.randint(0, w)) | A.keys(range(0, rng.randint(1, 8))),
                A.block(rng.randint(1, n)) & A.causal,
                A.strided(rng.randint(1, n // 2)) | A.sliding(w),
                A.random(rng.randint(8, 64), rng.randint(0, 4), rng.randint(0, 999)) | A.causal,
            ])
            pats.append(A.resolve(expr, tokens=n))
        source = "builders"
    return [(f"random[{source}] {i}: `{str(p.attend)[:60]}` ({p.layout.to_attn()})", p)
            for i, p in enumerate(pats[:count])]


def runtime_inputs(torch, p, dev, seed=0):
    """Inputs for a runtime-input pattern: packed documents of random lengths, a length 3/4 of N."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for inp in p.inputs:
        if inp.kind == "ids":
            cuts = torch.randint(1, p.n, (3,), generator=g).sort().values
            ids = torch.zeros(p.n, dtype=torch.int64)
            for c in cuts:
                ids[c:] += 1
            out[inp.name] = ids[None].to(dev)
        else:
            out[inp.name] = torch.tensor([3 * p.n // 4], device=dev)
    return out


# ---------------------------------------------------------------------------------------------
# phase 1: correctness

def check_case(torch, p, dtype, dev, heads: int, D: int, budget: Budget):
    """{"fwd": err, "bwd": err, "oracle": ..., "ok": bool} for the triton backend against fp32."""
    import attnlang

    H = p.heads or heads
    oracle = "reference" if H * p.n * p.n <= DENSE_LIMIT else "torch"
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, p.n, D, generator=g).to(dev) for _ in range(4))
    inputs = runtime_inputs(torch, p, dev)
    results = []
    for backend, dt in (("triton", dtype), (oracle, torch.float32)):
        if budget.case_over():
            raise TimeoutError("case over its time share")
        fn = attnlang.compile(p, backend=backend)
        qq, kk, vv = (t.to(dt).requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qq, kk, vv, return_lse=True, **inputs)
        grads = torch.autograd.grad(out, (qq, kk, vv), do.to(dt))
        results.append([out.detach(), lse.detach(), *grads])
    errs = []
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        a, b = a.float(), b.float()
        if name == "lse":  # empty rows: -inf in both
            if not torch.equal(torch.isinf(a), torch.isinf(b)):
                errs.append(math.inf)
                continue
            a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
        if torch.isnan(a).any() != torch.isnan(b).any():
            errs.append(math.inf)
            continue
        d = (a - b).abs().nan_to_num(nan=0.0).max().item() if a.numel() else 0.0
        errs.append(d / max(1.0, b.abs().nan_to_num(nan=0.0).max().item() if b.numel() else 1.0))
    tf, tb = TOL[str(dtype).split(".")[-1]]
    fwd, bwd = max(errs[:2]), max(errs[2:])
    return {"fwd": fwd, "bwd": bwd, "oracle": oracle, "ok": fwd <= tf and bwd <= tb}


# ---------------------------------------------------------------------------------------------
# phase 2: speed

def timer(torch, dev, quick):
    """fn -> median seconds: triton.testing.do_bench on CUDA, perf_counter elsewhere."""
    if dev.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 80) * 1e-3

    def cpu(fn, reps=3):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    return cpu


def speed_case(torch, p, dtype, dev, heads, D, target, budget, time_fn, smoke):
    """One row of the speed table (dict); each measurement fails on its own."""
    import attnlang
    from attnlang.pattern import Pyramid
    from attnlang.runtime.call import check_call
    from attnlang.runtime.triton import load_module
    from attnlang.pyramid import pattern_content as pyramid_content

    H = p.heads or heads
    N = p.n
    row = {"N": N, "H": H, "D": D, "notes": []}
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fwd_args = [t.detach() for t in (q, k, v)]
    content = None
    if isinstance(p.attend, Pyramid):
        content = pyramid_content(p, q[0].detach().float().cpu().numpy(), k[0].detach().float().cpu().numpy())
        plan = attnlang.make_plan(p, content=content)
    elif p.reads_content:
        call = check_call(p, q, k, v, None, {}, None)
        plan, content = call.plan(0), call.content(0)
    else:
        plan = attnlang.make_plan(p)
    visited = sum(plan.stats(plan.group_for_head(h).lo)["visited"] for h in range(H)) \
        if p.heads else plan.stats()["visited"] * H
    row.update(tile=f"{plan.block_m}x{plan.block_n}", visited=visited,
               tile_density=plan.stats()["tile_density"])
    tile_flops = 4.0 * visited * plan.block_m * plan.block_n * D
    dense_flops = 4.0 * H * N * N * D
    try:
        rep = attnlang.simulate(plan, target, head_dim=D, heads=H, content=content)
        row["sim_fwd_ms"] = rep.forward.time_s * 1e3
        row["sim_bwd_ms"] = rep.backward.time_s * 1e3
    except Exception as e:
        row["notes"].append(f"simulator: {_err(e)}")

    if p.reads_content:
        ours = attnlang.compile(p, backend="triton")
        fn_ours = ours
    else:
        module = load_module(plan, target)
        fn_ours = module.attention

    impls = {"attnlang": fn_ours}
    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the interpreter smoke test has no flash kernel on CPU: the default backend runs there
        backends = [SDPBackend.MATH] if dev.type != "cuda" else [SDPBackend.FLASH_ATTENTION]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    impls["sdpa"] = sdpa
    if not p.reads_content:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            block_mask = attnlang.to_block_mask(p, H=H).to(dev)
            flex = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
            impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
        except Exception as e:
            row["notes"].append(f"flex: {_err(e)}")


    for impl, fn in impls.items():
        for mode in ("fwd", "fwdbwd"):
            if budget.case_over():
                row["notes"].append(f"{impl} {mode}: skipped (case over its time share)")
                continue

            def step(fn=fn, mode=mode):
                if mode == "fwd":  # no autograd graph (what inference runs; CPU flex insists)
                    with torch.no_grad():
                        return fn(*fwd_args)
                fn(q, k, v).backward(do)
            try:
                step()  # compile / autotune outside the timing
                t = time_fn(step)
            except Exception as e:  # record and go on: one failure must not hide the rest
                row["notes"].append(f"{impl} {mode}: {_err(e)}")
                continue
            flops = (dense_flops if impl == "sdpa" else tile_flops) * (3.5 if mode == "fwdbwd" else 1.0)
            row[f"{impl}_{mode}_ms"] = t * 1e3
            row[f"{impl}_{mode}_tflops"] = flops / t / 1e12
    return row


# ---------------------------------------------------------------------------------------------
# report

def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def markdown(meta, checks, speeds, notes) -> str:
    L = [f"## GPU check: {meta['device']} ({meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
         f"attnlang {meta['attnlang']})", ""]
    L.append(f"### Correctness: triton vs fp32 oracle, B = 1, D = {meta['check_D']}, forward (out, lse) "
             "and backward (dq, dk, dv)")
    L.append("")
    L.append("Error: max |got - want| / max(1, max |want|). Tolerance (fwd / bwd): "
             + "; ".join(f"{k} {a:g} / {b:g}" for k, (a, b) in TOL.items() if k in meta["dtypes"]) + ".")
    L.append("")
    L.append("| case | N | dtype | oracle | fwd err | bwd err | result | note |")
    L.append("|---|---:|---|---|---:|---:|---|---|")
    for c in checks:
        res = "ok" if c.get("ok") else ("skipped" if c.get("skipped") else ("ERROR" if c.get("error") else "FAIL"))
        note = "; ".join(x for x in (c.get("note"), c.get("error")) if x)
        L.append(f"| {c['case']} | {c.get('N', '—')} | {c['dtype']} | {c.get('oracle', '—')} | "
                 f"{_f(c.get('fwd'), '.2e')} | {_f(c.get('bwd'), '.2e')} | {res} | {note} |")
    L.append("")
    L.append(f"### Speed: {meta['speed_dtype']}, D = {meta['speed_D']}, B = 1, median ms; TFLOP/s on visited tiles "
             f"(SDPA: on N^2); simulator target {meta['target']}")
    L.append("")
    L.append("| case | N | H | tile | tile density | attnlang fwd ms | TFLOP/s | flex fwd ms | TFLOP/s | SDPA fwd ms "
             "| TFLOP/s | sim fwd ms | attnlang f+b ms | TFLOP/s | flex f+b ms | SDPA f+b ms | sim f+b ms | notes |")
    L.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in speeds:
        g = r.get
        simfb = None if g("sim_fwd_ms") is None or g("sim_bwd_ms") is None else g("sim_fwd_ms") + g("sim_bwd_ms")
        L.append(f"| {r['case']} | {g('N', '—')} | {g('H', '—')} | {g('tile', '—')} | "
                 f"{_f(g('tile_density'), '.4f')} | "
                 f"{_f(g('attnlang_fwd_ms'), '.3f')} | {_f(g('attnlang_fwd_tflops'), '.3g')} | "
                 f"{_f(g('flex_fwd_ms'), '.3f')} | {_f(g('flex_fwd_tflops'), '.3g')} | "
                 f"{_f(g('sdpa_fwd_ms'), '.3f')} | {_f(g('sdpa_fwd_tflops'), '.3g')} | {_f(g('sim_fwd_ms'), '.3f')} | "
                 f"{_f(g('attnlang_fwdbwd_ms'), '.3f')} | {_f(g('attnlang_fwdbwd_tflops'), '.3g')} | "
                 f"{_f(g('flex_fwdbwd_ms'), '.3f')} | {_f(g('sdpa_fwdbwd_ms'), '.3f')} | {_f(simfb, '.3f')} | "
                 f"{'; '.join(g('notes', []))} |")
    for n in notes:
        L.append(f"\n- {n}")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for check.md and check.json")
    ap.add_argument("--quick", action="store_true", help=f"examples {', '.join(QUICK)} and 2 random patterns")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny cases on CPU under TRITON_INTERPRET=1 (fp16/fp32), same code path")
    ap.add_argument("--only", nargs="*", help="pattern or example file names")
    ap.add_argument("--random", type=int, default=None, help="random patterns to check (default 6, quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=400.0, 
                    help="seconds for the whole run (default 400: 8 minutes less start-up and one overrunning step)")
    ap.add_argument("--heads", type=int, default=16, help="speed phase heads")
    ap.add_argument("--head-dim", type=int, default=128, help="speed phase head dim")
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args(argv)

    torch = _need()
    smoke = args.cpu_smoke
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke runs Triton kernels under the interpreter: run it as "
                     "TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke")
        dev = torch.device("cpu")
        dtypes = [torch.float16, torch.float32]  # the interpreter refuses bf16
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_check.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                     "nothing was checked. On CPU: TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke")
        dev = torch.device("cuda")
        dtypes = [torch.bfloat16, torch.float16]
    import triton

    import attnlang
    from attnlang.pattern import Pyramid  # noqa: F401  (fail early if the runtime cannot import)

    if not smoke:  # one flex compile per shape and mask: keep them compiled, not eager (eager flex is dense)
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    budget = Budget(args.budget)
    target = _target(torch, dev)
    notes = []
    if smoke:
        cases = []
        for fname, name, params in SMOKE:
            p = attnlang.resolve(ROOT / "examples" / fname, name, **params)
            cases.append((f"{fname}:{name}", p, p, "smoke: " + ",".join(f"{k}={v}" for k, v in params.items())))
        randoms = random_cases(1 if args.random is None else args.random, args.seed, 96)
        check_D, speed_D, heads = 16, 16, 2
    else:
        cases = example_cases(set(args.only or ()), args.quick)
        nr = (2 if args.quick else 6) if args.random is None else args.random
        randoms = random_cases(nr, args.seed, 512) if nr else []
        check_D, speed_D, heads = 64, args.head_dim, args.heads
    speed_dtype = dtypes[0]
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (TRITON_INTERPRET=1)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "triton": triton.__version__, "attnlang": getattr(attnlang, "__version__", "?"), "target": target,
            "dtypes": [str(d).split(".")[-1] for d in dtypes], "check_D": check_D,
            "speed_D": speed_D, "speed_dtype": str(speed_dtype).split(".")[-1], "budget_s": args.budget}

    # Phase 1 gets half of the budget (no speed phase: all of it); phase 2 the rest.
    check_end = args.budget * (1.0 if args.no_speed else 0.5)
    check_list = [(label, small, note) for label, _, small, note in cases] + [(l, p, "") for l, p in randoms]
    checks = []
    jobs = [(c, dt) for c in check_list for dt in dtypes]
    for i, ((label, p, note), dt) in enumerate(jobs):
        row = {"case": label, "dtype": str(dt).split(".")[-1], "note": note}
        checks.append(row)
        if p is None:
            row["error"] = note
            continue
        row["N"] = p.n
        if not budget.begin_case(check_end, len(jobs) - i):
            row["skipped"] = True
            row["note"] = "skipped: correctness phase out of time"
            continue
        try:
            row.update(check_case(torch, p, dt, dev, 2, check_D, budget))
        except Exception as e:
            row["error"] = _err(e)
            if os.environ.get("GPU_CHECK_TRACE"):
                traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{time.monotonic() - budget.start:6.1f}s] check {label} {row['dtype']}: "
              f"{'ok' if row.get('ok') else row.get('error') or 'FAIL'}", file=sys.stderr, flush=True)

    speeds = []
    if not args.no_speed:
        time_fn = timer(torch, dev, args.quick or smoke)
        speed_list = [(label, paper) for label, paper, _, _ in cases if paper is not None]
        for i, (label, p) in enumerate(speed_list):
            row = {"case": label, "notes": []}
            speeds.append(row)
            if p.inputs:
                row["notes"].append("runtime inputs: checked, not timed")
                continue
            if not budget.begin_case(args.budget - 5.0, len(speed_list) - i):
                row["notes"].append("skipped: out of the time budget")
                continue
            try:
                row.update(speed_case(torch, p, speed_dtype, dev, heads, speed_D, target, budget, time_fn, smoke))
            except Exception as e:
                row["notes"] = row.get("notes", []) + [_err(e)]
                if os.environ.get("GPU_CHECK_TRACE"):
                    traceback.print_exc()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[{time.monotonic() - budget.start:6.1f}s] speed {label}", file=sys.stderr, flush=True)

    bad = [c for c in checks if not c.get("ok") and not c.get("skipped")]
    notes.append(f"correctness: {sum(1 for c in checks if c.get('ok'))} ok, {len(bad)} failed or errored, "
                 f"{sum(1 for c in checks if c.get('skipped'))} skipped; run took "
                 f"{time.monotonic() - budget.start:.0f} s of a {args.budget:.0f} s budget")
    md = markdown(meta, checks, speeds, notes)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.md").write_text(md)
    (out / "check.json").write_text(json.dumps({"meta": meta, "checks": checks, "speed": speeds, "notes": notes},
                                               indent=1, default=str))
    print(md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
