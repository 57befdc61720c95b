"""The public API: every spec kind through parse / resolve / mask / compile, and its errors."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnlang
from attnlang import AttnError, causal, sliding
from attnlang.pattern import Pattern

ROOT = pathlib.Path(__file__).resolve().parents[2]
SWA = ROOT / "examples" / "swa.attn"
TEXT = """
pattern local(N = 32, r = 3) {
    tokens n[N]
    attend causal & sliding(r)
}
"""


@pytest.fixture
def attn_file(tmp_path):
    path = tmp_path / "local.attn"
    path.write_text(TEXT)
    return path


def test_import_attnlang_loads_neither_torch_nor_triton():
    code = "import sys, attnlang; attnlang.parse('pattern p { tokens n[4]\\n attend causal }'); " \
           "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parse_accepts_text_path_and_str_path(attn_file):
    for spec in (TEXT, attn_file, str(attn_file)):
        assert attnlang.parse(spec).names == ["local"]


def test_parse_rejects_other_types():
    with pytest.raises(AttnError, match="parse"):
        attnlang.parse(42)


def test_missing_file_is_an_attn_error(tmp_path):
    with pytest.raises(AttnError, match="nope.attn"):
        attnlang.parse(str(tmp_path / "nope.attn"))


@pytest.mark.parametrize("kind", ["pattern", "expr", "path", "str_path", "text"])
def test_every_spec_kind_gives_the_same_mask(kind, attn_file):
    want = Pattern.create(causal & sliding(3), tokens=32).mask()
    spec = {"pattern": Pattern.create(causal & sliding(3), tokens=32), "expr": causal & sliding(3),
            "path": attn_file, "str_path": str(attn_file), "text": TEXT}[kind]
    kw = {"tokens": 32} if kind == "expr" else {}
    assert np.array_equal(attnlang.mask(spec, **kw), want)
    assert attnlang.resolve(spec, **kw).n == 32


def test_parameters_override_defaults(attn_file):
    p = attnlang.resolve(attn_file, N=16, r=1)
    assert p.n == 16 and dict(p.params)["r"] == 1
    assert attnlang.mask(attn_file, N=16, r=1)[0].sum() == 16 + 15


def test_unknown_parameter_suggests_the_closest(attn_file):
    with pytest.raises(AttnError, match="'r'"):
        attnlang.resolve(attn_file, rr=2)


def test_resolve_errors_name_what_is_wrong():
    with pytest.raises(AttnError, match="tokens="):
        attnlang.resolve(causal & sliding(3))
    with pytest.raises(AttnError, match="already bound"):
        attnlang.resolve(Pattern.create(causal, tokens=8), N=4)
    with pytest.raises(AttnError, match="pattern spec"):
        attnlang.resolve(3.5)


def test_mask_refuses_more_than_one_gib_before_evaluating():
    with pytest.raises(AttnError, match="1 GiB"):
        attnlang.mask(causal, tokens=40000)
    with pytest.raises(AttnError, match="4 heads"):
        attnlang.mask(causal, tokens=20000, heads=4)


def test_mask_of_by_head_pattern_has_one_slice_per_head():
    src = "pattern m { tokens n[16]\n heads 4\n attend by head {\n 0..1: causal\n 1..4: sliding(2)\n }\n}"
    m = attnlang.mask(src)
    assert m.shape == (4, 16, 16)
    assert np.array_equal(m[0], np.tril(np.ones((16, 16), bool)))
    assert all(np.array_equal(m[h], attnlang.mask(sliding(2), tokens=16)[0]) for h in (1, 2, 3))


def _qkv(n, h=2, d=8, hkv=None):
    g = torch.Generator().manual_seed(n)
    return (torch.randn(1, h, n, d, generator=g), torch.randn(1, hkv or h, n, d, generator=g),
            torch.randn(1, hkv or h, n, d, generator=g))


def _dense(mask, q, k, v):
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~torch.from_numpy(mask), float("-inf")), -1) @ v


@pytest.mark.parametrize("kind", ["pattern", "expr", "path", "str_path", "text"])
def test_compile_every_spec_kind_with_reference_backend(kind, attn_file):
    spec = {"pattern": Pattern.create(causal & sliding(3), tokens=32), "expr": causal & sliding(3),
            "path": attn_file, "str_path": str(attn_file), "text": TEXT}[kind]
    kw = {"tokens": 32} if kind == "expr" else {}
    fn = attnlang.compile(spec, backend="reference", **kw)
    q, k, v = _qkv(32)
    out, lse = fn(q, k, v, return_lse=True)
    want = _dense(attnlang.mask(causal & sliding(3), tokens=32)[0], q, k, v)
    torch.testing.assert_close(out, want)
    assert lse.shape == (1, 2, 32) and lse.dtype == torch.float32


def test_compile_binds_a_1d_length_at_call_time():
    fn = attnlang.compile(causal & sliding(2), backend="reference")
    src = attnlang.compile("pattern p(N) { tokens n[N]\n attend causal & sliding(2) }", backend="reference")
    for n in (8, 20):
        q, k, v = _qkv(n)
        want = _dense(attnlang.mask(causal & sliding(2), tokens=n)[0], q, k, v)
        torch.testing.assert_close(fn(q, k, v), want)
        torch.testing.assert_close(src(q, k, v), want)


def test_compile_gqa_and_parameter_override():
    fn = attnlang.compile(SWA, backend="reference", N=64, W=8)
    q, k, v = _qkv(64, h=4, hkv=2)
    want = _dense(attnlang.mask(SWA, N=64, W=8)[0], q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(fn(q, k, v), want)


def test_compile_errors():
    with pytest.raises(AttnError, match="did you mean 'reference'"):
        attnlang.compile(causal, backend="referense", tokens=8)
    fn = attnlang.compile(causal, backend="reference", tokens=8)
    with pytest.raises(AttnError, match="N = 8"):
        fn(*_qkv(9))
    with pytest.raises(AttnError, match="torch.Tensor"):
        fn(np.zeros((1, 1, 8, 4)), *_qkv(8)[1:])
    with pytest.raises(AttnError, match="multiple"):
        fn(*_qkv(8, h=3, hkv=2))


def test_runtime_input_plans_are_kept_per_distinct_value(monkeypatch):
    """Layers calling with the same document ids plan once; other ids (or a collision of the
    hash, simulated here) plan anew, and every call still equals the reference."""
    import torch

    from attnlang import api
    from attnlang.pattern import Pattern, causal, same

    p = Pattern.create(causal & same("doc"), 32, inputs={"doc": "ids"})
    fn, ref = attnlang.compile(p, backend="torch"), attnlang.compile(p, backend="reference")
    planned = []
    real = api._planner
    monkeypatch.setattr(api, "_planner", lambda pat, inputs: planned.append(1) or real(pat, inputs))
    q = k = v = torch.randn(1, 2, 32, 8)
    a, b = torch.tensor([[0] * 12 + [1] * 20]), torch.tensor([[0] * 20 + [1] * 12])
    for doc in (a, a, b, a):
        torch.testing.assert_close(fn(q, k, v, doc=doc), ref(q, k, v, doc=doc))
    assert len(planned) == 2  # a once, b once
    monkeypatch.setattr(api.hashlib, "blake2b", lambda **kw: _Constant())
    planned.clear()
    fn2 = attnlang.compile(p, backend="torch")
    for doc in (a, b):  # same digest, different values: never the other's plan
        torch.testing.assert_close(fn2(q, k, v, doc=doc), ref(q, k, v, doc=doc))
    assert len(planned) == 2


class _Constant:
    """A hash whose digest never changes: every key collides."""

    def update(self, _):
        pass

    def digest(self):
        return b"same"
