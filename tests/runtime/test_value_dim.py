"""A value head dim ``Dv`` different from the query/key head dim ``D`` (MLA-style attention,
DeepSeek: qk 192, v 128): the output is ``[B, H, N, Dv]`` on every backend, and it and the
gradients equal the dense reference."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.pattern import Pattern, causal, sliding
from attnlang.runtime import chunks, flex, reference, torch_exec
from strategies import patterns
from test_backends import assert_same, oracle_planner, random_order, run_backend


def qkv(p, D, Dv, B=1, H=2, Hkv=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, p.n, D, generator=gen), torch.randn(B, Hkv, p.n, D, generator=gen),
            torch.randn(B, Hkv, p.n, Dv, generator=gen))


@settings(max_examples=12, deadline=None)
@given(p=patterns(max_n=80, max_leaves=4), bm=st.sampled_from([8, 16]), bn=st.sampled_from([8, 16]),
       dims=st.sampled_from([(8, 4), (4, 12), (12, 8), (6, 16)]), pad=st.integers(0, 9),
       permute=st.booleans(), fused=st.booleans(), seed=st.integers(0, 99))
def test_torch_value_dim_random_patterns(p, bm, bn, dims, pad, permute, fused, seed):
    order = random_order(p.n, pad, seed) if permute else None
    q, k, v = qkv(p, *dims, B=2, H=4, Hkv=2, seed=seed)
    ref = run_backend(reference, p, q, k, v, oracle_planner(bm, bn))
    assert ref[0].shape == (2, 4, p.n, dims[1])
    old = chunks.USE_FUSED
    chunks.USE_FUSED = fused
    try:
        got = run_backend(torch_exec, p, q, k, v, oracle_planner(bm, bn, order))
    finally:
        chunks.USE_FUSED = old
    assert_same(ref, got)


@pytest.mark.parametrize("backend", ["torch", "reference", "flex"])
def test_mla_shapes_through_compile(backend):
    """DeepSeek's MLA head dims through the public API (the default backend crashed on this)."""
    fn = attnlang.compile(causal & sliding(16), tokens=64, backend=backend)
    q, k, v = torch.randn(1, 2, 64, 192), torch.randn(1, 2, 64, 192), torch.randn(1, 2, 64, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = fn(q, k, v)
            ref = attnlang.compile(causal & sliding(16), tokens=64, backend="reference")(q, k, v)
    assert out.shape == (1, 2, 64, 128)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("src", [
    "causal & (block(8) | route(8, top = 2))",
    "pyramid(block = 8, query_block = 8, levels = [1, 2], keep = [0.5, 0.5], among = causal)",
])
def test_value_dim_content_patterns(src):
    """route(...) and pyramid(...) on the torch backend (their own executors) with Dv != D."""
    p = attnlang.compile(f"pattern p {{ tokens n[64]\n attend {src} }}").pattern
    q, k, v = qkv(p, 12, 8, B=2, H=4, Hkv=2)
    planner = lambda pat, inputs: attnlang.make_plan(pat)  # noqa: E731
    assert_same(run_backend(reference, p, q, k, v, planner), run_backend(torch_exec, p, q, k, v, planner))
