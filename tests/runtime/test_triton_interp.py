"""Generated Triton kernels under the CPU interpreter equal the dense reference.

Forward (out, lse) and backward (dq, dk, dv) for every primitive family, analytic and tabulated
plans, permuted orders with padding, GQA, by-head patterns, runtime inputs, ragged tails, empty
rows, fp32 and fp16. Shapes stay tiny: the interpreter needs milliseconds per tile.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402

from attnlang.pattern import (  # noqa: E402
    Pattern, axial, block, causal, full, global_, grid, halo, keys, neighborhood, none, queries,
    random, route, same, sliding, strided, valid, window,
)
from attnlang.plan import Plan  # noqa: E402
from attnlang.planner import make_plan  # noqa: E402
from attnlang.runtime import reference  # noqa: E402
from attnlang.runtime import triton as triton_backend  # noqa: E402
from attnlang.runtime.call import check_call  # noqa: E402
from strategies import patterns  # noqa: E402
from test_route_family import routed as st_routed  # noqa: E402
from test_triton_routing import clear_margins  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def oracle_planner(block_m=16, block_n=16, order=None):
    """Plan.from_mask at fixed tile sizes (the dense oracle), optionally with an order."""
    def plan(p, inputs=None):
        return Plan.from_mask(p, p.mask(inputs=inputs), block_m, block_n,
                              order(p) if callable(order) else order)
    return plan


def fast_planner(block=16, order=None):
    return lambda p, inputs=None: make_plan(p, inputs=inputs, block_m=block, block_n=block, order=order)


def check(p, planner, B=1, H=2, Hkv=None, D=16, dtype=torch.float32, inputs=None, grads=True, seed=0):
    """Run the triton backend and the reference on the same call; compare out, lse, grads."""
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    N = p.n
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    do = torch.randn(B, H, N, D, generator=g).to(dtype)
    results = []
    for backend in (triton_backend, reference):
        qq, kk, vv = (t.clone().requires_grad_(grads) for t in (q, k, v))
        call = check_call(p, qq, kk, vv, None, inputs or {}, planner)
        assert backend.supports(call) is None
        out, lse = backend.run(call)
        res = [out.detach(), lse.detach()]
        if grads:
            res += list(torch.autograd.grad(out, (qq, kk, vv), do))
        results.append(res)
    return assert_results_close(results, dtype)


def assert_results_close(results, dtype):
    """``results = [triton, reference]``, each ``[out, lse, dq?, dk?, dv?]``: same dtypes, the
    same ``-inf`` rows of lse, and values within fp32 / half tolerances."""
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert a.dtype == b.dtype, name
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b)), "lse -inf rows differ"
            a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")
    return results


# -- every primitive family -------------------------------------------------------------------

FAMILIES = {
    "causal_ragged": (causal, 50),
    "window": (window(before=5, after=3), 40),
    "causal_axis": (causal("t") & ~block((1, 2, 2)), (2, 4, 5)),
    "global": (global_([1, 7, 30]) | keys(range(10, 14)) | queries(40, 44), 48),
    "long_key_list": (keys(list(range(0, 48, 5))) | causal & sliding(3), 48),
    "random": (random(block=8, count=2, seed=3) | causal & sliding(2), 40),
    "neighborhood": (neighborhood(window=(3, 5), dilation=(1, 2), stride=(1, 2), causal=(False, True)), (6, 10)),
    "natten_causal_1d": (neighborhood(window=7, stride=3, causal=True), 45),
    "swin_shift": (block(size=(4, 4), shift=2), (8, 8)),
    "strided": (strided((2, 3)), (6, 6)),
    "grid": (grid(2), (4, 6)),
    "axial": (axial("w") | axial("h"), (5, 7)),
    "halo": (halo(block=(4, 4), halo=1), (8, 6)),
    "not_causal_empty_rows": (~causal, 40),
    "none": (none, 32),
    "full": (full, 36),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name):
    expr, tokens = FAMILIES[name]
    check(Pattern.create(expr, tokens), oracle_planner())


def test_runtime_inputs_same_and_valid():
    p = Pattern.create(causal & same("doc") & valid("len"), 40, inputs={"doc": "ids", "len": "length"})
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10, [0] * 25 + [1] * 15])
    check(p, oracle_planner(), B=2, inputs={"doc": doc, "len": torch.tensor([33, 40])})


def test_not_same_runtime_input_envelope():
    p = Pattern.create(~same("doc") | sliding(2), 32, inputs={"doc": "ids"})
    doc = torch.tensor([0] * 12 + [1] * 20)
    check(p, oracle_planner(), B=1, inputs={"doc": doc})


# -- plans: analytic, permuted, planner-made ------------------------------------------------

def test_analytic_plan_from_planner():
    p = Pattern.create(causal & sliding(20), 100)
    plan = make_plan(p, block_m=16, block_n=16)
    assert plan.groups[0].analytic is not None
    from attnlang.codegen.triton import generate_kernels

    k = generate_kernels(plan)
    assert k.analytic == [True] and "G0_PART_IDX" not in k.args["_attn_fwd"]
    check(p, fast_planner(16))


def test_permuted_order_with_padding():
    p = Pattern.create(neighborhood(window=(3, 3), dilation=(2, 1)), (6, 10))
    plan = make_plan(p, block_m=16, block_n=16, order="tiled")
    assert plan.order is not None and (plan.order < 0).any(), "want padding positions"
    check(p, fast_planner(16, "tiled"))


def test_random_permutation_oracle():
    p = Pattern.create(causal & sliding(6) | keys(range(0, 3)), 40)
    rng = np.random.default_rng(1)

    def order(pat):
        pos = np.concatenate([rng.permutation(pat.n), -np.ones(8, dtype=np.int64)])
        return rng.permutation(pos)

    check(p, oracle_planner(16, 32, order))


def test_planner_3d_morton_hilbert():
    p = Pattern.create(neighborhood(window=(2, 3, 3), causal=(True, False, False)), (3, 6, 6))
    check(p, fast_planner(16, "morton"))


def test_sidecar_tables(monkeypatch):
    import attnlang.codegen.module as m

    monkeypatch.setattr(m, "SIDECAR_BYTES", 16)  # force the sidecar file for any table
    check(Pattern.create(causal & sliding(5) | random(block=16, count=1, seed=2), 48), oracle_planner(), H=1)


# -- heads, GQA, dtypes, head dims ----------------------------------------------------------

def test_gqa():
    check(Pattern.create(causal & sliding(9), 48), oracle_planner(), H=4, Hkv=2)


def test_by_head_split_gqa_group():
    # Heads 0..1 and 2..3 share one kv head under MQA: dK/dV sums both branches in one program.
    p = Pattern.create({(0, 1): causal, (1, 3): ~causal | sliding(1), (3, 4): none}, 40, heads=4)
    check(p, oracle_planner(), H=4, Hkv=1, B=2)


def test_fp16():
    check(Pattern.create(causal & sliding(12), 64), oracle_planner(32, 16), dtype=torch.float16)


def test_head_dim_padding():
    check(Pattern.create(block(16) | causal & sliding(3), 32), oracle_planner(), H=1, D=24)


def test_forward_without_grad_and_lse_dtype():
    p = Pattern.create(causal, 32)
    (out, lse, *_), _ = check(p, oracle_planner(), grads=False, D=32)
    assert lse.dtype == torch.float32 and out.shape == (1, 2, 32, 32)


@settings(max_examples=8, deadline=None)
@given(patterns(max_rank=2, max_n=48, max_leaves=3))
def test_random_patterns(p):
    check(p, oracle_planner(), H=1)


# -- capability messages ----------------------------------------------------------------------

def test_supports_says_why(monkeypatch):
    p = Pattern.create(causal, 32)
    q = torch.randn(1, 1, 32, 16, dtype=torch.bfloat16)
    call = check_call(p, q, q, q, None, {}, oracle_planner())
    assert "bfloat16" in triton_backend.supports(call)
    monkeypatch.delenv("TRITON_INTERPRET")
    q = q.float()
    call = check_call(p, q, q, q, None, {}, oracle_planner())
    assert "TRITON_INTERPRET" in triton_backend.supports(call)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 32, 300)
    call = check_call(p, q, q, q, None, {}, oracle_planner())
    assert "300" in triton_backend.supports(call)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_matches_reference():
    p = Pattern.create(causal & sliding(100), 1024)
    q, k, v = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = check_call(p, q, k, v, None, {}, fast_planner(64))
    out, lse = triton_backend.run(call)
    ref, rlse = reference.run(call)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# -- per-call tables: runtime inputs keep exact full tiles; routed patterns --------------------

def test_runtime_inputs_use_per_batch_tables():
    # Two documents per item: tiles inside one document are full for that item only, which a
    # static envelope cannot know. The per-call tables carry them with a batch dimension.
    from attnlang.codegen.triton import call_arrays

    p = Pattern.create(same("doc"), 64, inputs={"doc": "ids"})
    doc = torch.tensor([[0] * 32 + [1] * 32, [0] * 16 + [1] * 48])
    q = torch.randn(2, 1, 64, 16)
    call = check_call(p, q, q, q, None, {"doc": doc}, oracle_planner())
    mod, kernels = triton_backend.per_call_module(call.plan(0), "cpu")
    arrays = call_arrays(kernels, triton_backend.item_plans(call), [], 1)
    assert arrays["G0_FULL_NUM"].shape == (2, 1, 4) and arrays["G0_PART_NUM"].sum() == 0
    assert arrays["G0_FULL_NUM"][1, 0].tolist() == [1, 3, 3, 3]
    check(p, oracle_planner(), B=2, inputs={"doc": doc})


def test_per_call_module_is_reused_and_static_plans_are_not_rehashed(monkeypatch):
    p = Pattern.create(causal & same("doc"), 32, inputs={"doc": "ids"})
    q = torch.randn(1, 1, 32, 16)
    for ids in ([0] * 32, [0] * 10 + [1] * 22):
        triton_backend.run(check_call(p, q, q, q, None, {"doc": torch.tensor(ids)}, oracle_planner()))
    assert sum(k[0] == triton_backend._pattern_text(p) for k in triton_backend._PER_CALL) == 1
    static = Pattern.create(causal & sliding(4), 32)
    plan = oracle_planner()(static)
    call = check_call(static, q, q, q, None, {}, lambda *_: plan)
    triton_backend.run(call)
    monkeypatch.setattr(triton_backend, "plan_key", lambda *a: pytest.fail("re-hashed a cached plan"))
    triton_backend.run(call)


def _routed_check(p, H=2, Hkv=1, B=2, seed=0, dtype=torch.float32, clear=False):
    """Triton vs the reference for a routed pattern, with planted Q/K and a loss reading lse.
    ``clear``: skip (hypothesis) inputs whose routing decisions sit within rounding of their cut,
    where the Triton routing kernels and the numpy oracle may round either way."""
    g = torch.Generator().manual_seed(seed)
    D = 16
    u = torch.randn(1, 1, 1, D, generator=g)
    q = torch.randn(B, H, p.n, D, generator=g) * 0.5 + torch.randn(B, H, p.n, 1, generator=g) * u
    k = torch.randn(B, Hkv, p.n, D, generator=g) * 0.5 + torch.randn(B, Hkv, p.n, 1, generator=g) * 2 * u
    v = torch.randn(B, Hkv, p.n, D, generator=g)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if clear:
        assume(all(clear_margins(p, q[b], k[b], 1 / np.sqrt(D)) for b in range(B)))
    res = []
    for backend in (triton_backend, reference):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        call = check_call(p, qq, kk, vv, None, {}, None)
        assert backend.supports(call) is None
        out, lse = backend.run(call)
        loss = (out.float() * torch.cos(out.float())).sum() + (lse.nan_to_num(neginf=0.0) * 0.3).sum()
        res.append((out, lse, *torch.autograd.grad(loss, (qq, kk, vv))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *res):
        # planted Q/K give large scores: fp32 gradients as in test_route (1e-4), outputs tighter
        tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else \
            dict(atol=2e-5, rtol=2e-5) if name in ("out", "lse") else dict(atol=1e-4, rtol=1e-4)
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")


ROUTED = {
    "moba": (causal & (block(16) | route(16, top=1, among=causal - block(16))), 64),
    "threshold_ragged": (route(12, threshold=0.5, query_block=8), 44),
    "biformer_2d": (route((2, 4), top=2, query_block=(2, 4)), (4, 8)),
    "vmoba_head_scope": (causal & route((2, 2), top=1, scope="head"), (4, 6)),
    "pbs_permuted": (causal & (block(8) | route(8, top=1, permute_keys=16)), 48),
}


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_routed(name):
    expr, tokens = ROUTED[name]
    _routed_check(Pattern.create(expr, tokens, tile_q=16, tile_kv=16) if isinstance(tokens, int)
                  else Pattern.create(expr, tokens))


def test_routed_by_head_fp16():
    p = Pattern.create({(0, 1): causal & sliding(3), (1, 3): route(16, top=1) | causal & sliding(2)},
                       48, heads=3, tile_q=16, tile_kv=16)
    _routed_check(p, H=3, Hkv=1, B=1, dtype=torch.float16)


def test_lse_gradient_static():
    # A loss on lse alone: its gradient (delta - dlse in the backward) equals the reference's.
    p = Pattern.create(causal & sliding(5) | ~causal & sliding(0), 40)
    q, k, v = (torch.randn(1, 2, 40, 16).requires_grad_() for _ in range(3))
    grads = []
    for backend in (triton_backend, reference):
        call = check_call(p, q, k, v, None, {}, oracle_planner())
        _, lse = backend.run(call)
        grads.append(torch.autograd.grad((lse * torch.linspace(-1, 2, 40)).sum(), (q, k, v), allow_unused=True))
    for a, b, t in zip(*grads, (q, k, v)):  # lse does not depend on v: None or zeros
        zero = torch.zeros_like(t)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, atol=1e-5, rtol=1e-5)


def test_pyramid_refused_with_reason():
    # pyramid(...) runs on its own kernels (tests/runtime/test_triton_pyramid.py) for among = full,
    # causal or causal(axis); any other among is refused with the reason.
    from attnlang.pattern import pyramid

    p = Pattern.create(pyramid(block=8, query_block=8, levels=[1, 2], keep=[0.5, 0.5], among=~causal), 32)
    q = torch.randn(1, 1, 32, 16)
    why = triton_backend.supports(check_call(p, q, q, q, None, {}, None))
    assert "pyramid among = ~causal" in why and "backend='torch'" in why


@settings(max_examples=10, deadline=None)
@given(st_routed())
def test_random_routed_patterns(case):
    # The route engineer's strategy (random blocks, boxes, among, top/threshold, scope, permute).
    p, (H, Hkv), seed = case
    _routed_check(p, H=H, Hkv=Hkv, B=1, seed=seed % 1000, clear=True)
