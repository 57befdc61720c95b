"""``attnlang compile FILE``: write a standalone Triton module for a pattern.

    $ attnlang compile examples/swa.attn --set N=16384 -o kernels/ --target h100
    wrote kernels/swa.py, kernels/swa.plan.txt
    ...

``DIR/NAME.py`` imports only torch, triton and the standard library and defines
``attention(q, k, v, scale=None, return_lse=False, **runtime_inputs)`` with autograd;
``DIR/NAME.plan.txt`` is the printed plan. Large index tables go to ``DIR/NAME.tables.bin``
next to the module. Files are written to temporaries first and renamed only when all of them
are complete, so a failure never leaves a half-written module behind.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

from attnlang.api import make_plan
from attnlang.codegen.module import (
    TARGETS, check_dtype, check_head_dim, check_target, generate_module, module_name, module_plan,
)
from attnlang.commands import add_spec_arguments, check_tile_flags, resolve_pattern
from attnlang.errors import AttnError, did_you_mean
from attnlang.pattern import ORDERS
from attnlang.simulate import simulate_plan

NAME = "compile"
HELP = "generate a standalone Triton module (NAME.py + NAME.plan.txt) for a pattern"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_spec_arguments(p)
    p.add_argument("-o", "--out", metavar="DIR", default=".", help="output directory (default: .)")
    p.add_argument("--target", default="h100", metavar="T",
                   help=f"GPU the autotune candidates are chosen for: {', '.join(TARGETS)} (default h100)")
    p.add_argument("--block-m", type=int, metavar="M", help="query tile size in tokens")
    p.add_argument("--block-n", type=int, metavar="N", help="key tile size in tokens")
    p.add_argument("--order", metavar="O", help=f"token order: {', '.join(ORDERS)}")
    p.add_argument("--head-dim", type=int, metavar="D",
                   help="only accept this head dim at call time (default: any in 1..256)")
    p.add_argument("--dtype", metavar="T", help="only accept this dtype: fp16, bf16 or fp32 (default: any)")


def run(args: argparse.Namespace) -> int:

    # Check every option before planning, so bad input costs nothing and writes nothing.
    target = check_target(args.target)
    head_dim = check_head_dim(args.head_dim)
    dtype = check_dtype(args.dtype)
    if args.order is not None and args.order not in ORDERS:
        raise AttnError(f"unknown --order '{args.order}'{did_you_mean(args.order, ORDERS)}",
                        hint=f"valid orders: {', '.join(ORDERS)}")
    check_tile_flags(args)
    out = pathlib.Path(args.out)
    _check_writable(out)

    pattern = resolve_pattern(args)
    if pattern.reads_content:
        raise AttnError(f"pattern '{pattern.name}' reads Q/K content (route/pyramid): its tiles are chosen "
                        "per call by attnlang's routing stage and planner, which a standalone module "
                        "does not carry",
                        hint="run it through attnlang.compile(..., backend='triton') (route) or "
                             "backend='torch' (route, pyramid)")
    plan = module_plan(pattern, lambda p: make_plan(p, block_m=args.block_m, block_n=args.block_n,
                                                    order=args.order))
    name = module_name(pattern.name)
    module = generate_module(plan, name=name, target=target, head_dim=head_dim, dtype=dtype)
    files = {out / f"{name}.py": module.source.encode(), out / f"{name}.plan.txt": (str(plan) + "\n").encode()}
    if module.sidecar is not None:
        files[out / module.sidecar_name] = module.sidecar
    _write_all(files)

    print(f"wrote {', '.join(str(f) for f in files)}")
    for g in plan.groups:
        s = plan.stats(g.lo)
        who = "all heads" if g.hi is None else f"heads {g.lo}..{g.hi}"
        print(f"  {who}: {s['visited']} of {plan.q_tiles * plan.kv_tiles} tiles of {plan.block_m} x "
              f"{plan.block_n} visited ({s['full']} full, {s['partial']} partial), tile bound "
              f"{s['tile_bound']:.2f}x, {'closed-form loop bounds' if g.analytic is not None else 'index tables'}")
    headline = _headline(plan, target)
    if headline:
        print(f"  {headline}")
    print(f"  use: from {name} import attention; out = attention(q, k, v"
          + "".join(f", {i.name}=..." for i in pattern.inputs) + ")")
    return 0


def _headline(plan, target: str) -> str | None:
    """The simulator's forward prediction, when it can model this plan."""
    if target == "cpu" or plan.pattern.inputs:
        return None
    try:
        r = simulate_plan(plan, target)
    except (ImportError, AttnError):
        return None
    return (f"simulator ({target}, bf16, D = 128): forward predicted {r.forward.predicted:.2f}x over dense "
            f"(tile bound {r.tile_bound:.2f}x)")


def _check_writable(out: pathlib.Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttnError(f"cannot create output directory {out}: {e.strerror or e}",
                        hint="pass -o with a writable directory") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise AttnError(f"output directory {out} is not writable", hint="pass -o with a writable directory")


def _write_all(files: dict[pathlib.Path, bytes]) -> None:
    """Write every file to a temporary next to it, then rename them all (no partial output)."""
    temps: list[tuple[str, pathlib.Path]] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a vendored module is ordinary source
        for tmp, path in temps:
            os.replace(tmp, path)
    except OSError as e:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise AttnError(f"cannot write {path}: {e.strerror or e}", hint="pass -o with a writable directory") from None
