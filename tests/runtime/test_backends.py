"""Every CPU backend equals the reference backend: outputs, lse and gradients.

Plans come from the dense oracle ``Plan.from_mask`` with random tile sizes and random token
orders (permutations with padding), so the executors are tested on orders the planner may never
choose, and from ``attnlang.compile`` end to end.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.pattern import Pattern, causal, same, sliding, valid
from attnlang.plan import Plan
from attnlang.runtime import chunks, flex, reference, torch_exec
from attnlang.runtime.call import check_call
from strategies import patterns

FP32 = dict(atol=1e-5, rtol=1e-5)


def oracle_planner(block_m: int, block_n: int, order: np.ndarray | None = None):
    def plan(p, inputs):
        return Plan.from_mask(p, p.mask(heads=p.heads or 1, inputs=inputs), block_m, block_n, order)
    return plan


def random_order(n: int, pad: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.concatenate([np.arange(n), -np.ones(pad, dtype=np.int64)]))


def run_backend(mod, p, q, k, v, planner, inputs=None, grads=True):
    """``(out, lse, (dq, dk, dv))`` with fixed random cotangents for out and lse."""
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    call = check_call(p, q, k, v, None, inputs or {}, planner)
    out, lse = mod.run(call)
    if not grads:
        return out, lse, None
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to(out.dtype)
    gl = torch.randn(lse.shape, generator=gen)
    loss = (out.float() * go.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * gl).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def assert_same(a, b, tol=FP32):
    (o1, l1, g1), (o2, l2, g2) = a, b
    torch.testing.assert_close(o2.float(), o1.float(), **tol)
    assert torch.equal(torch.isinf(l1), torch.isinf(l2)), "rows with no allowed key differ"
    torch.testing.assert_close(torch.nan_to_num(l2, neginf=0.0), torch.nan_to_num(l1, neginf=0.0), **tol)
    if g1 is not None and g2 is not None:
        for name, x, y in zip("qkv", g1, g2):
            torch.testing.assert_close(y.float(), x.float(), **tol, msg=lambda m: f"d{name}: {m}")


def tensors(p, B=1, H=2, Hkv=1, D=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, p.n, D, generator=gen).to(dtype)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


@pytest.fixture(params=[True, False], ids=["fused", "explicit"])
def chunk_kernel(request, monkeypatch):
    """Run torch-executor tests with the fused CPU op and with the explicit chunk kernel."""
    monkeypatch.setattr(chunks, "USE_FUSED", request.param)
    return request.param


@settings(max_examples=15)
@given(p=patterns(max_n=96, max_leaves=4), bm=st.sampled_from([8, 16]), bn=st.sampled_from([8, 16]),
       pad=st.integers(0, 9), permute=st.booleans(), seed=st.integers(0, 99))
def test_torch_matches_reference_random_patterns(p, bm, bn, pad, permute, seed):
    order = random_order(p.n, pad, seed) if permute else None
    q, k, v = tensors(p, B=2, H=4, Hkv=2, seed=seed)
    ref = run_backend(reference, p, q, k, v, oracle_planner(bm, bn))
    assert_same(ref, run_backend(torch_exec, p, q, k, v, oracle_planner(bm, bn, order)))


@settings(max_examples=10)
@given(p=patterns(max_n=64, max_leaves=4), bm=st.sampled_from([8, 16]), bn=st.sampled_from([8, 16]),
       pad=st.integers(0, 9), seed=st.integers(0, 99))
def test_flex_matches_reference_random_patterns(p, bm, bn, pad, seed):
    order = random_order(p.n, pad, seed)
    q, k, v = tensors(p, B=1, H=4, Hkv=2, seed=seed)
    ref = run_backend(reference, p, q, k, v, oracle_planner(bm, bn), grads=False)
    assert_same(ref, run_backend(flex, p, q, k, v, oracle_planner(bm, bn, order), grads=False))


def test_explicit_chunk_kernel_matches_reference(chunk_kernel):
    p = Pattern.create(causal & sliding(7) | attnlang.keys(0, 3), 70)
    q, k, v = tensors(p, B=2, H=6, Hkv=3)
    for order in (None, random_order(70, 11, 3)):
        ref = run_backend(reference, p, q, k, v, oracle_planner(16, 8))
        assert_same(ref, run_backend(torch_exec, p, q, k, v, oracle_planner(16, 8, order)))


def test_rows_with_no_allowed_key(chunk_kernel):
    # queries 10..20 see nothing; key-only tiles partially empty.
    p = Pattern.create(causal - attnlang.queries(10, 20), 40)
    q, k, v = tensors(p, H=2, Hkv=2)
    out = run_backend(torch_exec, p, q, k, v, oracle_planner(8, 8, random_order(40, 5, 1)))
    assert torch.isinf(out[1][0, :, 10:20]).all() and (out[0][0, :, 10:20] == 0).all()
    assert_same(run_backend(reference, p, q, k, v, oracle_planner(8, 8)), out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (6, 3)])
def test_gqa_and_head_groups(heads, kv_heads, chunk_kernel):
    # by-head ranges 0..1 / 1..heads split GQA groups: the executor must fall back to per-head K/V.
    p = Pattern.create({(0, 1): causal & sliding(3), (1, heads): attnlang.block(5) | attnlang.sink(2)},
                       30, heads=heads)
    q, k, v = tensors(p, H=heads, Hkv=kv_heads)
    ref = run_backend(reference, p, q, k, v, oracle_planner(8, 8))
    assert_same(ref, run_backend(torch_exec, p, q, k, v, oracle_planner(8, 8, random_order(30, 3, 0))))
    assert_same(ref, run_backend(flex, p, q, k, v, oracle_planner(8, 8), grads=False))


def test_runtime_inputs_per_batch_item(chunk_kernel):
    p = Pattern.create(causal & same("doc") & valid("len"), 48, inputs={"doc": "ids", "len": "length"})
    doc = torch.tensor([[0] * 10 + [1] * 30 + [2] * 8, [3] * 25 + [4] * 23])
    inputs = {"doc": doc, "len": torch.tensor([40, 48])}
    q, k, v = tensors(p, B=2, H=2, Hkv=1)
    ref = run_backend(reference, p, q, k, v, oracle_planner(8, 8), inputs)
    assert_same(ref, run_backend(torch_exec, p, q, k, v, oracle_planner(16, 8, random_order(48, 4, 2)), inputs))
    assert_same(ref, run_backend(flex, p, q, k, v, oracle_planner(8, 8), inputs, grads=False))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, dict(atol=2e-3, rtol=2e-3)),
                                       (torch.bfloat16, dict(atol=2e-2, rtol=2e-2))])
def test_half_precision(dtype, tol, chunk_kernel):
    p = Pattern.create(causal & sliding(9), 64)
    q, k, v = tensors(p, H=2, Hkv=1, dtype=dtype)
    ref = run_backend(reference, p, q, k, v, oracle_planner(16, 16))
    got = run_backend(torch_exec, p, q, k, v, oracle_planner(16, 16))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in got[2])
    assert_same(ref, got, tol)


def test_compile_end_to_end_with_planner():
    spec = "pattern na(H = 12, W = 20) { tokens h[H], w[W]\n attend neighborhood(window = (3, 5), dilation = (1, 2)) | sink(3) }"
    q, k, v = (torch.randn(2, 4, 240, 16, requires_grad=True) for _ in range(3))
    outs = {}
    for name in ("reference", "torch", "flex"):
        fn = attnlang.compile(spec, backend=name)
        if name == "flex":
            with torch.no_grad():
                outs[name] = (*fn(q, k, v, return_lse=True), None)
            continue
        o, l = fn(q, k, v, return_lse=True)
        outs[name] = (o, l, torch.autograd.grad(o.square().sum() + l.sum(), (q, k, v)))
    assert_same(outs["reference"], outs["torch"])
    assert_same(outs["reference"], outs["flex"])


def test_default_backend_on_cpu_is_torch():
    from attnlang.runtime.dispatch import choose

    p = Pattern.create(causal, 16)
    q = torch.randn(1, 1, 16, 4)
    assert choose(check_call(p, q, q, q, None, {}, oracle_planner(8, 8))) == "torch"
