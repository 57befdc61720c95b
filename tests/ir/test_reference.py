"""The reference backend against an independent float64 softmax written here in numpy.

The mask comes from the Pattern IR (the semantics) or, for runtime inputs, is rebuilt here from
the ids/lengths directly; softmax, GQA head mapping, empty rows and lse are recomputed in float64
without torch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang
from attnlang import causal, keys, none, queries, same, sliding, valid
from attnlang.pattern import Pattern
from strategies import patterns


def softmax64(q, k, v, masks, scale=None):
    """float64 masked attention: ``masks`` is bool [B or 1, Hq, N, N]; returns (out, lse)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    B, Hq, N, D = q.shape
    group = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros_like(q)
    lse = np.full((B, Hq, N), -np.inf)
    for b in range(B):
        for h in range(Hq):
            m = masks[b if masks.shape[0] > 1 else 0, h]
            s = scale * q[b, h] @ k[b, h // group].T
            for i in range(N):
                allowed = np.nonzero(m[i])[0]
                if len(allowed) == 0:
                    continue  # no key: zero row, lse = -inf
                row = s[i, allowed]
                mx = row.max()
                e = np.exp(row - mx)
                out[b, h, i] = e @ v[b, h // group][allowed] / e.sum()
                lse[b, h, i] = mx + math.log(e.sum())
    return out, lse


def run_reference(p: Pattern, q, k, v, **kw):
    return attnlang.compile(p, backend="reference")(q, k, v, return_lse=True, **kw)


def assert_close(got, want, atol=1e-5):
    out, lse = got
    np.testing.assert_allclose(out.double().numpy(), want[0], atol=atol, rtol=1e-5)
    g, w = lse.double().numpy(), want[1]
    assert np.array_equal(np.isinf(g), np.isinf(w))
    np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], atol=atol, rtol=1e-5)


@settings(max_examples=25)
@given(p=patterns(max_n=96, max_leaves=4), b=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       d=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_random_patterns_match_float64_softmax(p, b, heads, d, seed):
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, p.n, d, generator=g)
    k = torch.randn(b, hkv, p.n, d, generator=g)
    v = torch.randn(b, hkv, p.n, d, generator=g)
    masks = p.mask(heads=hq)[None]
    assert_close(run_reference(p, q, k, v), softmax64(q, k, v, masks))


def test_rows_with_no_key_give_zeros_and_minus_inf_lse():
    p = Pattern.create(queries(range(0, 5)) & causal, tokens=12)
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    out, lse = run_reference(p, q, k, v)
    assert torch.all(out[:, :, 5:] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 5:])) and torch.all(torch.isfinite(lse[:, :, :5]))
    assert_close((out.detach(), lse.detach()), softmax64(q.detach(), k.detach(), v.detach(), p.mask(heads=2)[None]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_pattern_with_no_pair_at_all():
    p = Pattern.create(none, tokens=8)
    q = k = v = torch.randn(1, 1, 8, 4)
    out, lse = run_reference(p, q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_gqa_maps_query_heads_to_their_kv_head():
    p = Pattern.create(causal & sliding(3), tokens=20)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 20, 8, generator=g)
    k, v = torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    got = run_reference(p, q, k, v)
    assert_close(got, softmax64(q, k, v, p.mask(heads=6)[None]))
    # Query heads 0..2 use kv head 0, 3..5 kv head 1 (contiguous groups, as in GQA).
    dup = run_reference(p, q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1))
    torch.testing.assert_close(got[0], dup[0])


def test_same_doc_runtime_input_per_batch_item():
    n = 24
    p = Pattern.create(causal & same("doc"), tokens=n, inputs={"doc": "ids"})
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 3 + [2] * 18])
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(3))
    # The mask rebuilt from the ids directly, not through the IR.
    idx = np.arange(n)
    masks = np.stack([(d[:, None] == d[None, :]) & (idx[None, :] <= idx[:, None]) for d in doc.numpy()])
    masks = np.repeat(masks[:, None], 2, axis=1)
    assert_close(run_reference(p, q, k, v, doc=doc), softmax64(q, k, v, masks))
    # ids given as [N] are shared by every batch item
    one = run_reference(p, q, k, v, doc=doc[0])
    assert_close(one, softmax64(q, k, v, np.repeat(masks[:1], 2, axis=0)))


def test_valid_length_runtime_input_pads_rows_and_columns():
    n = 16
    p = Pattern.create(valid("len"), tokens=n, inputs={"len": "length"})
    q, k, v = (torch.randn(2, 1, n, 4) for _ in range(3))
    lengths = torch.tensor([16, 9])
    idx = np.arange(n)
    masks = np.stack([(idx[:, None] < L) & (idx[None, :] < L) for L in lengths.tolist()])[:, None]
    out, lse = run_reference(p, q, k, v, len=lengths)
    assert_close((out, lse), softmax64(q, k, v, masks))
    assert torch.all(out[1, :, 9:] == 0)


def test_by_head_patterns_use_their_branch():
    p = Pattern.create({(0, 1): causal, (1, 3): sliding(2) & keys(range(0, 10))}, tokens=14, heads=3)
    q, k, v = (torch.randn(1, 3, 14, 4) for _ in range(3))
    assert_close(run_reference(p, q, k, v), softmax64(q, k, v, p.mask()[None]))


def test_explicit_scale_and_half_precision():
    p = Pattern.create(causal, tokens=32)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    want = softmax64(q, k, v, p.mask(heads=2)[None], scale=0.3)
    assert_close(run_reference(p, q, k, v, scale=0.3), want)
    out, lse = run_reference(p, q.half(), k.half(), v.half(), scale=0.3)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), want[0], atol=3e-3)


@pytest.mark.parametrize("bad, words", [
    ({}, "needs runtime input"),
    ({"doc": torch.zeros(3, dtype=torch.int64)}, "must have shape"),
    ({"doc": torch.zeros(8)}, "integer tensor"),
    ({"doc": torch.zeros(8, dtype=torch.int64), "dok": torch.zeros(8, dtype=torch.int64)}, "unknown runtime input"),
])
def test_missing_or_bad_input_is_an_attn_error(bad, words):
    p = Pattern.create(causal & same("doc"), tokens=8, inputs={"doc": "ids"})
    q = k = v = torch.randn(1, 1, 8, 4)
    with pytest.raises(attnlang.AttnError, match=words):
        attnlang.compile(p, backend="reference")(q, k, v, **bad)
