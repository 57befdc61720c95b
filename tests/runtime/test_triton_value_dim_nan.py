"""The triton backend under TRITON_INTERPRET=1: a value head dim Dv != D (MLA) in the generated
kernels, forward and backward; NaN/Inf isolation (docs/reliability.md)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import attnlang  # noqa: E402
from attnlang.pattern import Pattern, causal, same, sliding, valid  # noqa: E402
from attnlang.runtime import reference  # noqa: E402
from attnlang.runtime import triton as triton_backend  # noqa: E402
from attnlang.runtime.call import check_call  # noqa: E402
from strategies import patterns  # noqa: E402
from test_nan_isolation import PADDED, check_isolated, poisons, tensors  # noqa: E402
from test_triton_interp import assert_results_close, fast_planner, oracle_planner  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def check_dims(p, planner, D, Dv, B=1, H=2, Hkv=1, inputs=None):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, p.n, D, generator=g), torch.randn(B, Hkv, p.n, D, generator=g)
    v, do = torch.randn(B, Hkv, p.n, Dv, generator=g), torch.randn(B, H, p.n, Dv, generator=g)
    results = []
    for backend in (triton_backend, reference):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        call = check_call(p, qq, kk, vv, None, inputs or {}, planner)
        assert backend.supports(call) is None
        out, lse = backend.run(call)
        assert out.shape == (B, H, p.n, Dv)
        results.append([out.detach(), lse.detach(), *torch.autograd.grad(out, (qq, kk, vv), do)])
    assert_results_close(results, torch.float32)


@pytest.mark.parametrize("D,Dv", [(24, 16), (16, 40), (8, 8)])
def test_value_dim_static(D, Dv):
    check_dims(Pattern.create(causal & sliding(5), 40), fast_planner(16), D, Dv, H=4, Hkv=2)


def test_value_dim_per_call_tables():
    """Runtime inputs: the per-call module (its tables passed per call) with Dv != D."""
    p = Pattern.create(causal & same("doc") & valid("len"), 48, inputs={"doc": "ids", "len": "length"})
    inputs = {"doc": torch.tensor([[0] * 20 + [1] * 28, [2] * 48]), "len": torch.tensor([40, 48])}
    check_dims(p, fast_planner(16), 12, 20, B=2, inputs=inputs)


@settings(max_examples=3, deadline=None)
@given(p=patterns(max_n=40, max_leaves=3), dims=st.sampled_from([(8, 16), (16, 8)]))
def test_value_dim_random_patterns(p, dims):
    check_dims(p, oracle_planner(16, 16), *dims)


def test_pyramid_value_dim_is_refused_with_the_way_out():
    fn = attnlang.compile("pattern p { tokens n[64]\n attend pyramid(block = 8, query_block = 8, "
                          "levels = [1, 2], keep = [0.5, 0.5], among = causal) }", backend="triton")
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(attnlang.AttnError, match="one head dim for q/k and v.*backend='torch'"):
        fn(q, q, torch.randn(1, 1, 64, 8))


# -- NaN/Inf isolation ------------------------------------------------------------------------

@settings(max_examples=4, deadline=None)
@given(p=patterns(max_n=40, max_leaves=3), data=st.data())
def test_triton_isolates(p, data):
    q, k, v = tensors(p.n, B=1)
    check_isolated(triton_backend, p, q, k, v, data.draw(poisons(p.n)), oracle_planner(16, 16))


@pytest.mark.parametrize("where", ["k", "v"])
def test_triton_padding_tail_poison(where):
    q, k, v = tensors(64, B=1)
    spots = [(key, where, float("nan"), True) for key in range(30, 64)]
    check_isolated(triton_backend, PADDED, q, k, v, spots, fast_planner(16), {"len": torch.tensor([30])})
