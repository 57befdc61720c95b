"""The flex bridge: BlockMask export (`attnlang.to_block_mask`) and its error paths."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnlang
from attnlang import causal, same, sliding
from attnlang.errors import AttnError


def eager_flex(q, k, v, bm):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=bm)


def test_to_block_mask_matches_flex_dense_semantics():
    n, r = 256, 20
    bm = attnlang.to_block_mask(causal & sliding(r), tokens=n)
    theirs = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k <= r), 1, 1, n, n, device="cpu",
                               BLOCK_SIZE=bm.BLOCK_SIZE)
    assert torch.equal(bm.to_dense(), theirs.to_dense())
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))  # distinct: dynamo trips on aliased inputs
    out = eager_flex(q, k, v, bm)
    ref = attnlang.compile(causal & sliding(r), tokens=n, backend="reference")(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_to_block_mask_sizes_and_inputs():
    bm = attnlang.to_block_mask(causal & sliding(8), tokens=128, B=2, H=3)
    assert bm.shape == (2, 3, 128, 128)
    p = attnlang.Pattern.create(causal & same("doc"), 64, inputs={"doc": "ids"})
    doc = torch.tensor([[0] * 20 + [1] * 44, [2] * 64])
    bm = attnlang.to_block_mask(p, B=2, inputs={"doc": doc})
    assert bm.shape[0] == 2
    q, k, v = (torch.randn(2, 1, 64, 8) for _ in range(3))  # distinct: dynamo trips on aliased inputs
    out = eager_flex(q, k, v, bm)
    ref = attnlang.compile(p, backend="reference")(q, k, v, doc=doc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttnError, match="runtime inputs"):
        attnlang.to_block_mask(p, B=2)


def test_to_block_mask_batch_follows_the_inputs():
    """Issue 11 item 12: B comes from batched ids; ids [N] serve queries of any batch."""
    n = 64
    pat = causal & same("doc") & attnlang.valid("len")
    doc = torch.tensor([[0] * 20 + [1] * 44, [2] * 30 + [3] * 34])
    q, k, v = (torch.randn(2, 1, n, 8) for _ in range(3))
    ref = attnlang.compile(pat, tokens=n, backend="reference")
    bm = attnlang.to_block_mask(pat, tokens=n, inputs={"doc": doc, "len": torch.tensor([50, 64])})
    assert bm.shape[0] == 2  # no B given: taken from the ids
    torch.testing.assert_close(eager_flex(q, k, v, bm), ref(q, k, v, doc=doc, len=torch.tensor([50, 64])),
                               atol=1e-5, rtol=1e-5)
    for B in (None, 2):  # one shared plan; B = 2 queries used to die with an IndexError in torch
        bm = attnlang.to_block_mask(pat, tokens=n, B=B, inputs={"doc": doc[1], "len": 40})
        assert bm.shape[0] == (B or 1)
        torch.testing.assert_close(eager_flex(q, k, v, bm),
                                   ref(q, k, v, doc=doc[1].expand(2, n), len=torch.tensor([40, 40])),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(AttnError, match="batch 2 but B = 3"):
        attnlang.to_block_mask(pat, tokens=n, B=3, inputs={"doc": doc, "len": 50})
    with pytest.raises(AttnError, match="shape"):
        attnlang.to_block_mask(pat, tokens=n, inputs={"doc": doc[:, :10], "len": 50})


def test_python_expressions_declare_their_inputs():
    """compile(causal & same("doc")) needs no `input` line; Pattern.create's hint is Python."""
    fn = attnlang.compile(causal & same("doc"), tokens=16)
    q = k = v = torch.randn(1, 1, 16, 8)
    ids = torch.tensor([[0] * 5 + [1] * 11])
    torch.testing.assert_close(fn(q, k, v, doc=ids),
                               attnlang.compile(causal & same("doc"), tokens=16, backend="reference")(q, k, v, doc=ids))
    with pytest.raises(AttnError) as e:
        attnlang.Pattern.create(causal & same("doc"), 16)
    assert "Pattern.create" in str(e.value) and "input doc: ids" not in str(e.value)


def test_flex_refuses_gradients_on_cpu_with_a_clear_error():
    fn = attnlang.compile(causal & sliding(4), tokens=32, backend="flex")
    q = torch.randn(1, 1, 32, 8, requires_grad=True)
    with pytest.raises(AttnError, match="no backward.*backend='torch'"):
        fn(q, q, q)
    with torch.no_grad():
        assert fn(q, q, q).shape == (1, 1, 32, 8)


def test_flex_reuses_the_block_mask_of_a_static_plan(monkeypatch):
    import attnlang.runtime.flex as flex

    built = []
    real = flex.block_mask
    monkeypatch.setattr(flex, "block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    fn = attnlang.compile(causal & sliding(8), tokens=64, backend="flex")
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    with torch.no_grad():
        first, second = fn(q, k, v), fn(q, k, v)
    assert len(built) == 1
    torch.testing.assert_close(first, second)
    ref = attnlang.compile(causal & sliding(8), tokens=64, backend="reference")(q, k, v)
    torch.testing.assert_close(second, ref, atol=1e-5, rtol=1e-5)
    # Runtime inputs give a fresh plan (and mask) per call: never served from the cache.
    p = attnlang.Pattern.create(causal & same("doc"), 64, inputs={"doc": "ids"})
    fd = attnlang.compile(p, backend="flex")
    ref = attnlang.compile(p, backend="reference")
    with torch.no_grad():
        for doc in (torch.tensor([0] * 20 + [1] * 44), torch.tensor([0] * 50 + [1] * 14)):
            torch.testing.assert_close(fd(q, k, v, doc=doc), ref(q, k, v, doc=doc), atol=1e-5, rtol=1e-5)


@given(st.data())
def test_flex_runs_the_one_natten_window(data):
    """The flex mask_mod calls ``natten_window`` with torch's min/max: same windows as numpy."""
    import numpy as np

    from attnlang.pattern import natten_window
    from attnlang.runtime.flex import _tmax, _tmin

    L = data.draw(st.integers(2, 40))
    d = data.draw(st.integers(1, L // 2))
    K = data.draw(st.integers(2, L // d))
    s = data.draw(st.integers(1, K))
    c = data.draw(st.booleans())
    i = np.arange(L)
    want = natten_window(i, L, K, d, s, c)
    got = natten_window(torch.arange(L), L, K, d, s, c, minimum=_tmin, maximum=_tmax)
    for w, g in zip(want, got):
        assert np.array_equal(w, g.numpy())
