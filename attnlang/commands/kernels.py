"""``attnlang kernels FILE``: compile a pattern's kernels for a GPU without one, and report them.

    $ attnlang kernels examples/swa.attn --set N=4096 --target sm_90 --dtype bf16 --head-dim 128
    kernel          warps stages  regs spill_st spill_ld  smem_B  wgmma  mma  tma  ...

Every generated kernel of the pattern's plan that does the attention work (``_attn_fwd``,
``_attn_bwd_dkdv``, ``_attn_bwd_dq``) is compiled for each of its autotune configs with
Triton's own compiler and ``ptxas`` (``triton.compile`` on an ``ASTSource``, for a
``GPUTarget``), so no GPU and no driver are needed. Per kernel and config it reports what
``ptxas -v`` says (registers, spill store/load bytes) and what the compiled kernel holds
(shared memory, static counts of ``wgmma``/``mma``/``tcgen05.mma`` PTX instructions, ``cp.async.bulk.tensor``
for TMA). The MMA counts are static: every head-group branch, masked/unmasked tile loop and
loop body unrolled by the compiler counts, so they are a per-kernel total, not per iteration.

The kernels are compiled as a launch would specialise them: pointers 16-byte aligned, the
constexprs of the generated launcher (block sizes, padded head dims, precision, EXACT = False).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from attnlang.api import make_plan
from attnlang.codegen.module import check_head_dim, generate_module, module_name, module_plan
from attnlang.commands import add_spec_arguments, check_tile_flags, resolve_pattern
from attnlang.errors import AttnError, did_you_mean
from attnlang.pattern import Pyramid

NAME = "kernels"
HELP = "compile the pattern's Triton kernels for a GPU target (no GPU needed) and report registers, spills, smem, MMA"

# --target: compute capability, and the autotune candidates of the generated module
ARCHS = {"sm_80": (80, "a100"), "sm_90": (90, "h100"), "sm_100": (100, "b200")}
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
          "fp32": "fp32", "float32": "fp32"}
KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
_FP32_POINTERS = {"LSE", "DELTA"}
_DATA_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}
_LOG = re.compile(r"Compiling entry function '(?P<fn>[^']+)'.*?Used (?P<regs>\d+) registers",
                  re.S)
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelReport:
    """One kernel compiled with one autotune config."""

    kernel: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes, from ptxas -v
    spill_loads: int
    shared: int  # bytes of shared memory the launch reserves
    wgmma: int  # static count of wgmma.mma_async instructions in the PTX
    mma: int  # static count of mma.sync instructions in the PTX
    tcgen05: int  # static count of tcgen05.mma instructions (sm_100 tensor-memory MMA) in the PTX
    tma: bool  # cp.async.bulk.tensor (TMA) in the PTX


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    p.add_argument("--target", default="sm_90", metavar="SM",
                   help=f"GPU architecture: {', '.join(ARCHS)} (default sm_90)")
    p.add_argument("--dtype", default="bf16", metavar="T", help="q/k/v dtype: bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--head-dim", type=int, default=128, metavar="D", help="head dim of q/k/v (default 128)")
    p.add_argument("--kernel", action="append", metavar="K", choices=KERNELS,
                   help=f"only this kernel (repeatable): {', '.join(KERNELS)} (default: all)")
    p.add_argument("--config", action="append", type=int, metavar="I",
                   help="only this autotune config, by index in the target's list (repeatable; default: all)")
    p.add_argument("--block-m", type=int, metavar="M", help="query tile size in tokens")
    p.add_argument("--block-n", type=int, metavar="N", help="key tile size in tokens")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def _check_args(args: argparse.Namespace) -> tuple[int, str, str, int]:
    if args.target not in ARCHS:
        raise AttnError(f"unknown --target '{args.target}'{did_you_mean(args.target, list(ARCHS))}",
                        hint=f"valid targets: {', '.join(ARCHS)} (compute capability 8.0, 9.0, 10.0)")
    dtype = DTYPES.get(str(args.dtype).lower())
    if dtype is None:
        raise AttnError(f"unknown --dtype '{args.dtype}'", hint="valid: bf16, fp16, fp32")
    head_dim = check_head_dim(args.head_dim)
    capability, configs = ARCHS[args.target]
    return capability, configs, dtype, head_dim


def run(args: argparse.Namespace) -> int:
    capability, config_target, dtype, head_dim = _check_args(args)
    check_tile_flags(args)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise AttnError("`attnlang kernels` compiles for a GPU, but TRITON_INTERPRET=1 makes Triton "
                        "interpret the kernels instead of compiling them",
                        hint="unset TRITON_INTERPRET (no GPU is needed to compile)")
    triton = _triton()
    pattern = resolve_pattern(args)
    if isinstance(pattern.attend, Pyramid) or pattern.reads_content:
        raise AttnError(f"pattern '{pattern.name}' reads Q/K content (route/pyramid): its kernels are "
                        "generated per call (route) or handwritten (pyramid), not from one static plan",
                        hint="`attnlang kernels` reports the kernels of static and runtime-input patterns")
    plan = module_plan(pattern, lambda p: make_plan(p, block_m=args.block_m, block_n=args.block_n))
    reports = compile_plan(plan, triton, capability, config_target, dtype, head_dim,
                           kernels=args.kernel or KERNELS, configs=args.config)
    if args.json:
        print(json.dumps({"pattern": pattern.name, "target": args.target, "dtype": dtype,
                          "head_dim": head_dim, "block_m": plan.block_m, "block_n": plan.block_n,
                          "n": plan.n, "triton": triton.__version__,
                          "kernels": [asdict(r) for r in reports]}, indent=2))
    else:
        print(f"kernels of '{pattern.name}': N = {plan.n}, tiles {plan.block_m} x {plan.block_n}, "
              f"{args.target}, {dtype}, head dim {head_dim}, triton {triton.__version__}")
        print(format_table(reports))
        print("wgmma/mma/tcgen05: static instruction counts in the PTX (all branches and unrolled loop "
              "bodies; not per iteration)")
    return 0


def _triton():
    try:
        import triton  # function-level: triton (optional; `import attnlang` must not load it)
        from triton.compiler import ASTSource  # noqa: F401  function-level: triton
        from triton.backends.compiler import GPUTarget  # noqa: F401  function-level: triton
    except ImportError as e:
        raise AttnError(f"`attnlang kernels` needs Triton's compiler, which is not importable ({e})",
                        hint="pip install 'attnlang[triton]' (or pip install triton); no GPU is needed") from None
    try:
        import torch  # noqa: F401  function-level: torch (the generated module imports it)
    except ImportError:
        raise AttnError("`attnlang kernels` needs torch: the generated module imports it",
                        hint="pip install 'attnlang[torch]'") from None
    return triton


def compile_plan(plan, triton, capability: int, config_target: str, dtype: str, head_dim: int,
                 kernels=KERNELS, configs=None) -> list[KernelReport]:
    """Compile ``kernels`` of ``plan``'s generated module for ``sm_<capability>``, one report per
    kernel and autotune config (``configs``: indices into the target's list, default all)."""
    from triton.backends.compiler import GPUTarget  # function-level: triton
    from triton.compiler import ASTSource  # function-level: triton

    target = GPUTarget("cuda", capability, 32)
    with tempfile.TemporaryDirectory(prefix="attnlang-kernels-") as tmp:
        mod = _load(plan, config_target, Path(tmp))
        out = []
        for name in kernels:
            tuner = getattr(mod, name)
            fn = getattr(tuner, "fn", tuner)  # the autotuner wraps the JITFunction
            all_configs = list(getattr(tuner, "configs", []))
            chosen = range(len(all_configs)) if configs is None else configs
            for i in chosen:
                if not 0 <= i < len(all_configs):
                    raise AttnError(f"--config {i} is not an autotune config of {name}",
                                    hint=f"valid: 0..{len(all_configs) - 1} ({config_target}: "
                                         f"{[(c.num_warps, c.num_stages) for c in all_configs]})")
                c = all_configs[i]
                sig, consts, attrs = _signature(fn, mod, name, dtype, head_dim)
                src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
                out.append(_compile(triton, src, target, name, c.num_warps, c.num_stages))
        return out


def _load(plan, config_target: str, tmp: Path):
    """Write the generated module (and its sidecar) to ``tmp`` and import it: @triton.jit needs
    the source in a file."""
    name = module_name(plan.pattern.name)
    m = generate_module(plan, name=name, target=config_target)
    path = tmp / f"{name}.py"
    path.write_text(m.source)
    if m.sidecar is not None:
        (tmp / m.sidecar_name).write_bytes(m.sidecar)
    spec = importlib.util.spec_from_file_location(f"attnlang_kernels_report.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _signature(fn, mod, kernel: str, dtype: str, head_dim: int):
    """Triton's signature, constexprs and alignment attributes for one launch of ``kernel``,
    with the argument types and constexprs the generated launcher passes (``_meta``)."""
    tables = {}
    for t, data in getattr(mod, "_TABLES", {}).items():
        tables[t] = data[0]
    meta = dict(N_TOKENS=mod.N_TOKENS, N_KERNEL=mod.N_KERNEL, KV_TILES=mod.KV_TILES, BLOCK_M=mod.BLOCK_M,
                BLOCK_N=mod.BLOCK_N, HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
                V_DIM=head_dim, BLOCK_DV=max(16, 1 << (head_dim - 1).bit_length()),
                PRECISION="ieee" if dtype == "fp32" else "tf32", EXACT=False)
    inputs = getattr(mod, "RUNTIME_INPUTS", {})
    sig, consts, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[arg] = "constexpr"
            consts[arg] = meta[arg]
            continue
        if arg in _DATA_POINTERS:
            sig[arg] = "*" + dtype
        elif arg in _FP32_POINTERS:
            sig[arg] = "*fp32"
        elif arg in _FLOAT_SCALARS:
            sig[arg] = "fp32"
        elif arg in ("H", "GQA"):
            sig[arg] = "i32"
            continue  # ints are not specialised: a launch with H = 16 would be, H = 12 not
        elif arg.startswith("IN_"):
            sig[arg] = "*i64" if inputs.get(arg[3:]) == "ids" else "*i32"
        elif arg in tables:
            sig[arg] = "*i8" if tables[arg] == "int8" else "*i32"
        else:
            sig[arg] = "*i32"  # per-call tables
        attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise AttnError(f"internal: no type for argument(s) {missing} of {kernel}")
    return sig, consts, attrs


def _compile(triton, src, target, name: str, num_warps: int, num_stages: int) -> KernelReport:
    from triton import knobs  # function-level: triton

    log = io.StringIO()
    # ptxas -v is only run on a compile, not a cache hit, and Triton prints its log to stdout
    with _knob(knobs.compilation, "always_compile", True), _knob(knobs.nvidia, "dump_ptxas_log", True), \
            contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # a launch uses the same default
        try:
            c = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
        except Exception as e:  # noqa: BLE001  Triton raises many types; the message is what matters
            text = str(e)
            if "ptxas" in text and ("No such file" in text or "not found" in text):
                raise AttnError(f"Triton cannot run ptxas to compile {name} for CUDA: {text.splitlines()[0]}",
                                hint="install a Triton wheel that ships ptxas, or set TRITON_PTXAS_PATH") from None
            raise AttnError(f"Triton failed to compile {name} (num_warps={num_warps}, "
                            f"num_stages={num_stages}): {text.strip().splitlines()[-1] if text.strip() else type(e).__name__}") from None
    text = log.getvalue()
    m = _LOG.search(text)
    # the entry function's own properties: a callee's block, if any, comes before it
    spills = _SPILL.search(text, m.start()) if m is not None else None
    if m is None or spills is None:
        raise AttnError(f"could not read ptxas -v output for {name}", hint=f"ptxas said: {text[-400:]!r}")
    ptx = c.asm["ptx"]
    return KernelReport(name, c.metadata.num_warps, c.metadata.num_stages, int(m.group("regs")),
                        int(spills.group(1)), int(spills.group(2)), int(c.metadata.shared),
                        len(re.findall(r"\bwgmma\.mma_async\b", ptx)), len(re.findall(r"\bmma\.sync\b", ptx)),
                        len(re.findall(r"\btcgen05\.mma\b", ptx)),
                        "cp.async.bulk.tensor" in ptx)


@contextlib.contextmanager
def _knob(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


COLUMNS = ("kernel", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared",
           "wgmma", "mma", "tcgen05", "tma")
HEADERS = ("kernel", "warps", "stages", "registers", "spill_st_B", "spill_ld_B", "shared_B", "wgmma",
           "mma", "tcgen05", "tma")


def format_table(reports: list[KernelReport]) -> str:
    """The reports as a fixed-width table, one row per kernel and config."""
    rows = [HEADERS] + [tuple(("yes" if v else "no") if isinstance(v, bool) else str(v)
                              for v in (getattr(r, c) for c in COLUMNS)) for r in reports]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)
