"""``attnlang kernels``: the generated kernels compile for sm_90 without a GPU, and the report
reads registers, spill bytes, shared memory and MMA counts from Triton's compiler and ptxas.

Spills are recorded, not asserted to be zero: the figures are what docs/benchmarks.md shows."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SWA = ROOT / "examples" / "swa.attn"


def _can_target_cuda() -> str | None:
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"Triton's CUDA compiler is not importable here ({e})"
    try:
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001  a missing binary raises differently per Triton version
        return f"Triton cannot find ptxas here ({e})"
    if not path or not (pathlib.Path(path).exists() or shutil.which(path)):
        return f"ptxas not found at {path!r}"
    return None


_SKIP = _can_target_cuda()
needs_ptxas = pytest.mark.skipif(_SKIP is not None, reason=f"cannot compile for CUDA: {_SKIP}")


def cli(capsys, *args):
    from attnlang.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_fresh(*args):
    """The command in a process of its own, as a user runs it: other test modules set
    TRITON_INTERPRET=1 before importing Triton, and a process that once interpreted kernels
    cannot compile them for a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", "import sys; from attnlang.cli import main; sys.exit(main(sys.argv[1:]))",
                          *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    return res.returncode, res.stdout, res.stderr


@needs_ptxas
def test_swa_compiles_for_sm90_with_numbers():
    args = (SWA, "--set", "N=512", "--target", "sm_90", "--dtype", "fp16", "--head-dim", "64", "--config", "0")
    rc, out, err = cli_fresh("kernels", *args)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("kernel "))
    for col in ("registers", "spill_st_B", "spill_ld_B", "shared_B", "wgmma", "mma", "tma"):
        assert col in header.split(), header
    rows = [ln.split() for ln in lines if ln.startswith("_attn_")]
    assert [r[0] for r in rows] == ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"]

    rc, out, err = cli_fresh("kernels", *args, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["target"] == "sm_90" and report["head_dim"] == 64 and report["dtype"] == "fp16"
    for k in report["kernels"]:
        # the first h100 autotune candidate: (num_warps, num_stages) = (4, 2)
        assert (k["num_warps"], k["num_stages"]) == (4, 2)
        assert isinstance(k["registers"], int) and 0 < k["registers"] <= 255
        assert isinstance(k["spill_stores"], int) and k["spill_stores"] >= 0
        assert isinstance(k["spill_loads"], int) and k["spill_loads"] >= 0
        assert isinstance(k["shared"], int) and k["shared"] > 0
        assert k["wgmma"] > 0  # sm_90 tl.dot of fp16 64 x 64 tiles lowers to wgmma
    # the table prints the same figures as the JSON
    for r, k in zip(rows, report["kernels"]):
        assert r[1:7] == [str(k[c]) for c in ("num_warps", "num_stages", "registers", "spill_stores",
                                              "spill_loads", "shared")]


@pytest.mark.parametrize("flags, message", [
    (["--target", "sm_91"], "unknown --target 'sm_91'"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--head-dim", "300"], "head dim 300 is not supported"),
    (["--config", "9"], "--config 9 is not an autotune config of _attn_fwd"),
])
def test_bad_flags_are_attn_errors(flags, message):
    if flags[0] == "--config" and _SKIP is not None:
        pytest.skip(f"cannot compile for CUDA: {_SKIP}")
    rc, out, err = cli_fresh("kernels", SWA, "--set", "N=512", "--kernel", "_attn_fwd", *flags)
    assert rc != 0 and message in err, err
    assert "Traceback" not in err


def test_interpreter_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc, out, err = cli(capsys, "kernels", SWA, "--set", "N=512", "--dtype", "bf16")
    assert rc != 0 and "TRITON_INTERPRET=1" in err and "unset TRITON_INTERPRET" in err, err


def test_missing_triton_says_how_to_install(capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_triton(name, *a, **kw):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real(name, *a, **kw)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    rc, out, err = cli(capsys, "kernels", SWA, "--set", "N=512")
    assert rc != 0 and "pip install" in err and "triton" in err, err


@needs_ptxas
@pytest.mark.parametrize("target, column", [("sm_80", "mma"), ("sm_100", "tcgen05")])
def test_each_target_counts_its_mma_instruction(target, column):
    """sm_80 lowers tl.dot to mma.sync and sm_100 to tcgen05.mma: a report that counted only
    wgmma would show no MMA at all there."""
    rc, out, err = cli_fresh("kernels", SWA, "--set", "N=512", "--target", target, "--dtype", "bf16",
                       "--head-dim", "64", "--kernel", "_attn_fwd", "--config", "0", "--json")
    assert rc == 0, err
    (k,) = json.loads(out)["kernels"]
    assert k[column] > 0 and k["wgmma"] == 0, k
