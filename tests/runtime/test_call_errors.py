"""Bad calls through attnlang.compile(...)(...): each an AttnError naming the problem."""
from __future__ import annotations

import pytest
import torch

import attnlang
from attnlang import causal, same, sliding, valid
from attnlang.errors import AttnError

N = 32


@pytest.fixture
def fn():
    return attnlang.compile(causal & sliding(4), tokens=N, backend="torch")


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("args,words", [
    ((t(1, 2, 30, 8), t(1, 2, 30, 8), t(1, 2, 30, 8)), "N = 30.*N = 32"),
    ((t(1, 2, N, 8), t(1, 2, N, 4), t(1, 2, N, 4)), "head dim 8.*k head dim 4"),
    ((t(1, 2, N, 8), t(1, 2, N, 8), t(1, 1, N, 8)), r"k \(1, 2, 32, 8\) and v \(1, 1, 32, 8\)"),
    ((t(2, 2, N, 8), t(1, 2, N, 8), t(1, 2, N, 8)), "batch sizes differ"),
    ((t(1, 2, N, 8), t(1, 2, N, 8, dtype=torch.float16), t(1, 2, N, 8)), "share one dtype"),
    ((t(1, 2, N, 8, dtype=torch.float64),) * 3, "float64 is not supported"),
    ((t(1, 3, N, 8), t(1, 2, N, 8), t(1, 2, N, 8)), "3 query heads are not a multiple of 2"),
    ((t(2, N, 8), t(2, N, 8), t(2, N, 8)), r"4 dimensions \[B, H, N, D\]"),
    # zero heads: a located AttnError, never a ZeroDivisionError inside a backend
    ((t(1, 0, N, 8), t(1, 1, N, 8), t(1, 1, N, 8)), "at least one head: q has 0 heads"),
    ((t(1, 0, N, 8), t(1, 0, N, 8), t(1, 0, N, 8)), "at least one head: q has 0 heads, k/v have 0"),
    ((t(1, 2, N, 8), t(1, 2, N, 8), t(1, 2, N, 0)), r"empty dimension.*v shape \(1, 2, 32, 0\)"),
])
def test_bad_tensors(fn, args, words):
    with pytest.raises(AttnError, match=words):
        fn(*args)


def test_not_a_tensor(fn):
    with pytest.raises(AttnError, match=r"q must be a torch.Tensor \[B, H, N, D\], got list"):
        fn([[1.0]], t(1, 1, N, 8), t(1, 1, N, 8))


def test_device_mix(fn):
    meta = torch.empty(1, 1, N, 8, device="meta")
    with pytest.raises(AttnError, match="one device"):
        fn(t(1, 1, N, 8), meta, meta)


def test_declared_heads():
    spec = "pattern p { tokens n[32]\n heads 4\n attend causal }"
    with pytest.raises(AttnError, match="declares heads 4 but q has 2"):
        attnlang.compile(spec, backend="torch")(t(1, 2, N, 8), t(1, 2, N, 8), t(1, 2, N, 8))


def test_runtime_inputs():
    p = attnlang.Pattern.create(causal & same("doc") & valid("len"), N, inputs={"doc": "ids", "len": "length"})
    fn = attnlang.compile(p, backend="torch")
    q = t(2, 1, N, 8)
    doc, ln = torch.zeros(2, N, dtype=torch.long), torch.tensor([N, 5])
    with pytest.raises(AttnError, match=r"needs runtime input\(s\) \['len'\]"):
        fn(q, q, q, doc=doc)
    with pytest.raises(AttnError, match=r"unknown runtime input\(s\) \['extra'\]"):
        fn(q, q, q, doc=doc, len=ln, extra=ln)
    with pytest.raises(AttnError, match=r"'doc' \(ids\) must have shape \[B, N\] = \[2, 32\]"):
        fn(q, q, q, doc=torch.zeros(2, N + 1, dtype=torch.long), len=ln)
    with pytest.raises(AttnError, match="'doc' must be an integer tensor"):
        fn(q, q, q, doc=torch.zeros(2, N), len=ln)
    with pytest.raises(AttnError, match=r"'len' \(length\) must lie in 0..32"):
        fn(q, q, q, doc=doc, len=torch.tensor([40, 1]))
    assert fn(q, q, q, doc=doc[0], len=ln).shape == q.shape  # [N] ids broadcast over the batch


def test_unknown_backend():
    with pytest.raises(AttnError, match="unknown backend 'toch'.*torch"):
        attnlang.compile(causal, tokens=N, backend="toch")
