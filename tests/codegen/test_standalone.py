"""`attnlang compile` writes a module that runs with only torch + triton importable.

The module is imported in a fresh interpreter (``python -I``) in which importing attnlang fails,
runs forward and backward under TRITON_INTERPRET=1, and is compared against reference values
computed here and saved to a file. Bad input leaves nothing behind.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import attnlang
from attnlang.api import resolve
from attnlang.errors import AttnError
from attnlang.cli import main
from attnlang.runtime import reference
from attnlang.runtime.call import check_call

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

RUNNER = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.modules["attnlang"] = None  # the vendored module must not need attnlang
sys.path.insert(0, sys.argv[1])
import torch
mod = __import__(sys.argv[2])
data = torch.load(sys.argv[3])
q, k, v, do = (data[n].clone().requires_grad_(n != "do") for n in ("q", "k", "v", "do"))
out, lse = mod.attention(q, k, v, return_lse=True, **data["inputs"])
dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
bad = [name for name, a, b in (("out", out, data["out"]), ("dq", dq, data["dq"]), ("dk", dk, data["dk"]),
                               ("dv", dv, data["dv"]))
       if not torch.allclose(a, b, atol=1e-5, rtol=1e-5)]
if not torch.equal(torch.isinf(lse), torch.isinf(data["lse"])) or not torch.allclose(
        lse.nan_to_num(neginf=0.0), data["lse"].nan_to_num(neginf=0.0), atol=1e-5):
    bad.append("lse")
assert "attnlang" not in sys.modules or sys.modules["attnlang"] is None
print("MISMATCH" if bad else "OK", bad)
"""


def _reference(pattern, inputs, H=2, Hkv=1, D=16, B=2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, pattern.n, D, generator=g)
    k = torch.randn(B, Hkv, pattern.n, D, generator=g)
    v = torch.randn(B, Hkv, pattern.n, D, generator=g)
    do = torch.randn(B, H, pattern.n, D, generator=g)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    call = check_call(pattern, qq, kk, vv, None, inputs, None)
    out, lse = reference.run(call)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    return dict(q=q, k=k, v=v, do=do, out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv, inputs=inputs)


@pytest.mark.parametrize("example, params, inputs", [
    ("swa.attn", {"N": 100, "W": 24}, {}),
    ("na2d.attn", None, {}),
    ("packed_docs.attn", {"N": 64}, {"doc": torch.tensor([0] * 20 + [1] * 30 + [2] * 14)}),
])
def test_compiled_module_runs_without_attnlang(tmp_path, capsys, example, params, inputs):
    src = EXAMPLES / example
    if params is None:  # shrink a 2-D example to interpreter size
        params = _small_params(src)
    argv = ["compile", str(src)] + (["-p", "nat"] if "na2d" in example else []) + ["-o", str(tmp_path / "out"), "--target", "cpu", "--block-m", "16", "--block-n", "16"]
    for key, val in params.items():
        argv += ["--set", f"{key}={val}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "tiles" in printed
    pattern = resolve(src, "nat" if "na2d" in example else None, **params)
    name = pattern.name
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [f"{name}.plan.txt", f"{name}.py"]
    source = (tmp_path / "out" / f"{name}.py").read_text()
    imports = [ln for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert {ln.split()[1].split(".")[0] for ln in imports} <= {"base64", "hashlib", "math", "os", "zlib", "torch", "triton"}
    assert pattern.to_attn().splitlines()[1].strip() in source  # header names the pattern
    data = _reference(pattern, inputs)
    torch.save(data, tmp_path / "ref.pt")
    (tmp_path / "run.py").write_text(RUNNER)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(tmp_path / "out"), name,
                        str(tmp_path / "ref.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK"), r.stdout


def _small_params(src):
    text = src.read_text()
    # na2d: a neighborhood on an (H, W) map; keep the file's window but a small map.
    assert "pattern" in text
    return {"H": 8, "W": 6, "K": 3} if "na2d" in src.name else {}


def test_bad_target_lists_valid_ones(tmp_path, capsys):
    assert main(["compile", str(EXAMPLES / "swa.attn"), "-o", str(tmp_path / "o"), "--target", "h900"]) == 1
    err = capsys.readouterr().err
    assert "unknown target 'h900'" in err and "h100, h200, b200, a100, cpu" in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compile", str(EXAMPLES / "swa.attn"), "-o", str(blocker / "sub")]) == 1
    assert "cannot create output directory" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        assert main(["compile", str(EXAMPLES / "swa.attn"), "-o", str(ro)]) == 1
        assert "not writable" in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("flag, value, words", [
    ("--head-dim", "300", "head dim 300 is not supported"),
    ("--dtype", "int8", "dtype 'int8' is not supported"),
])
def test_unsupported_head_dim_or_dtype(tmp_path, capsys, flag, value, words):
    assert main(["compile", str(EXAMPLES / "swa.attn"), "-o", str(tmp_path / "o"), flag, value]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_large_tables_go_to_a_sidecar(tmp_path, monkeypatch):
    import attnlang.codegen.module as m

    monkeypatch.setattr(m, "SIDECAR_BYTES", 16)
    argv = ["compile", str(EXAMPLES / "swa.attn"), "--set", "N=64", "--set", "W=8", "-o", str(tmp_path),
            "--block-m", "16", "--block-n", "16", "--order", "natural"]
    assert main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["swa.plan.txt", "swa.py", "swa.tables.bin"]


def test_routed_pattern_is_refused_with_the_way_to_run_it(tmp_path, capsys):
    assert main(["compile", str(EXAMPLES / "moba.attn"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "reads Q/K content" in err and "backend='triton'" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


BAD_INPUTS = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.modules["attnlang"] = None
sys.path.insert(0, sys.argv[1])
import torch
mod = __import__(sys.argv[2])
q = torch.randn(2, 2, 64, 16)
for doc in (torch.zeros(50, dtype=torch.long), torch.zeros(3, 64, dtype=torch.long), torch.zeros(2, 2, 64, dtype=torch.long)):
    try:
        mod.attention(q, q, q, doc=doc)
        print("ACCEPTED", tuple(doc.shape))
    except ValueError as e:
        print("ValueError:", e)
"""


def _run_vendored_packed_docs(tmp_path, script: str) -> str:
    """Vendor packed_docs (N = 64, 16 x 16 tiles) with `attnlang compile`, then run ``script`` on it
    in an isolated process where attnlang cannot be imported; its stdout."""
    argv = ["compile", str(EXAMPLES / "packed_docs.attn"), "--set", "N=64", "-o", str(tmp_path / "out"),
            "--target", "cpu", "--block-m", "16", "--block-n", "16"]
    assert main(argv) == 0
    (tmp_path / "run_vendored.py").write_text(script)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "run_vendored.py"), str(tmp_path / "out"), "packed_docs"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_standalone_module_wrong_length_runtime_input(tmp_path):
    """A wrong-length ``doc`` given to a vendored module gets attnlang's own message (it leaked
    torch's "expanded size" RuntimeError)."""
    lines = _run_vendored_packed_docs(tmp_path, BAD_INPUTS).splitlines()
    assert lines == [f"ValueError: runtime input 'doc' (ids) must have shape [B, N] = [2, 64] or [N], got {shape}"
                     for shape in ("(50,)", "(3, 64)", "(2, 2, 64)")]
    # the same words as the main API
    fn = attnlang.compile(EXAMPLES / "packed_docs.attn", N=64, backend="reference")
    q = torch.randn(2, 2, 64, 16)
    with pytest.raises(AttnError, match=re.escape(lines[0].removeprefix("ValueError: "))):
        fn(q, q, q, doc=torch.zeros(50, dtype=torch.long))


NAN_RUNNER = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.modules["attnlang"] = None
sys.path.insert(0, sys.argv[1])
import torch
mod = __import__(sys.argv[2])
g = torch.Generator().manual_seed(0)
doc = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)
q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
res = []
for val in (float("nan"), 3.0):
    kk, vv = k.clone().requires_grad_(), v.clone()
    with torch.no_grad():
        kk[:, :, 30] = val
    vv[:, :, 40] = val
    vv.requires_grad_()
    qq = q.clone().requires_grad_()
    out = mod.attention(qq, kk, vv, doc=doc)
    (out * out).sum().backward()
    res.append((out.detach(), qq.grad, kk.grad, vv.grad))
clean = torch.ones(64, dtype=torch.bool)
clean[30:50] = False  # doc 1 from the first poisoned key on (causal) sees it
ok = all(torch.isfinite(a[:, :, clean]).all() and torch.allclose(a[:, :, clean], b[:, :, clean], atol=1e-5)
         for a, b in zip(res[0][:2], res[1][:2]))
keys = clean.clone()
keys[20:50] = False  # keys of doc 1 are seen by its poisoned rows
ok = ok and all(torch.allclose(a[:, :, keys], b[:, :, keys], atol=1e-5) for a, b in zip(res[0][2:], res[1][2:]))
print("OK" if ok else "LEAK")
"""


def test_standalone_module_isolates_nan(tmp_path):
    """A vendored module keeps NaN in one document's keys/values out of the other documents'
    rows and gradients (its kernels' EXACT variant), with attnlang not importable."""
    assert _run_vendored_packed_docs(tmp_path, NAN_RUNNER).strip() == "OK"
