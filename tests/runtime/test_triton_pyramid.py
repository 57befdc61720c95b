"""The Triton pyramid(...) kernels (runtime/triton_pyramid.py) under the CPU interpreter equal the
dense reference: outputs, lse and the gradients to Q, K and V (through lse too).

1-D and 2-D boxes (ragged ones included), among full / causal / causal(axis), GQA, a batch whose
items select differently, levels [1, 2, 4], all blocks at level 1 (dense attention), rows that
see nothing, nothing kept, a query group over several tiles, fp32 and fp16; the dispatch from
the triton backend, and the refusal of other among. Tiny shapes: the interpreter runs
one Python step per program.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import attnlang  # noqa: E402
from attnlang.errors import AttnError  # noqa: E402
from attnlang.pattern import Causal, Pattern, causal, full, pyramid, sliding  # noqa: E402
from attnlang.runtime import reference  # noqa: E402
from attnlang.runtime import triton as triton_backend  # noqa: E402
from attnlang.runtime.call import check_call  # noqa: E402
from test_pyramid import _planted, pyramids  # noqa: E402
from test_triton_interp import assert_results_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def check(p, B=1, H=2, Hkv=1, D=16, dtype=torch.float32, oracle=None, seed=0):
    """Triton backend vs the reference (or ``oracle``, a pattern run densely by the reference)
    on planted Q/K (no near-tied block scores); the loss reads both out and lse."""
    q, k, v = (x.to(dtype) for x in _planted(p.layout, p.attend, B=B, Hq=H, Hkv=Hkv, D=D, seed=seed))
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=g).to(dtype)
    dlse = torch.randn(q.shape[:3], generator=g)
    results = []
    for backend, pattern in ((triton_backend, p), (reference, oracle or p)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        call = check_call(pattern, qq, kk, vv, None, {}, None)
        assert backend.supports(call) is None
        out, lse = backend.run(call)
        loss = (out.float() * do.float()).sum() + torch.where(torch.isinf(lse), 0.0, lse * dlse).sum()
        results.append([out.detach(), lse.detach(), *torch.autograd.grad(loss, (qq, kk, vv))])
    return assert_results_close(results, dtype)


CASES = {
    "1d_causal_levels_1_2_4": (pyramid(8, 8, [1, 2, 4], [0.25, 0.25, 0.25], causal), 48),
    "1d_full_query_groups_of_4": (pyramid(8, 4, [1, 2, 4, 8], [0.1, 0.2, 0.3, 0.4], full), 48),
    "2d_boxes_full": (pyramid((2, 4), (3, 4), [1, 2, 4], [0.3, 0.3, 0.2], full), (6, 8)),
    "2d_ragged_boxes_causal": (pyramid((2, 4), (3, 5), [1, 2], [0.5, 0.3], causal), (6, 10)),
    "2d_causal_axis": (pyramid((3, 5), 2, [1, 5], [0.4, 0.6], Causal("w")), (6, 10)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_reference(name):
    expr, tokens = CASES[name]
    check(Pattern.create(expr, tokens), H=4, Hkv=2)


def test_batch_items_select_differently():
    p = Pattern.create(pyramid(8, 8, [1, 2, 4], [0.25, 0.25, 0.25], causal), 48)
    check(p, B=2, H=2, Hkv=1, seed=3)


@pytest.mark.parametrize("among", [full, causal])
def test_all_blocks_at_level_one_is_dense(among):
    p = Pattern.create(pyramid((4, 4), (2, 8), levels=[1], keep=[1.0], among=among), (8, 8))
    check(p, oracle=Pattern.create(among, p.layout))


def test_rows_that_see_nothing():
    # Runs of 4 under causal are visible from their last key on: tokens 0..2 see nothing.
    p = Pattern.create(pyramid(4, 1, levels=[4], keep=[1.0], among=causal), 16)
    out, lse = check(p, H=1)[0][:2]
    assert torch.isinf(lse[0, 0, :3]).all() and torch.isfinite(lse[0, 0, 3:]).all()
    assert (out[0, 0, :3] == 0).all()


def test_group_over_several_tiles_and_wide_head_dim():
    # Head dim 160 (padded to 256) takes 32-token tiles, so the 40-token query group spans two.
    check(Pattern.create(pyramid(4, 40, [1, 2, 4], [0.3, 0.3, 0.3], causal), 40), H=1, D=160)


def test_nothing_kept():
    check(Pattern.create(pyramid(8, 8, [1, 2], [0.0, 0.0], causal), 32))


def test_fp16():
    check(Pattern.create(pyramid(8, 8, [1, 2, 4], [0.25, 0.25, 0.25], causal), 48), dtype=torch.float16)


def test_compile_dispatches_to_the_pyramid_kernels(monkeypatch):
    from attnlang.runtime import pyramid as torch_path

    p = Pattern.create(pyramid(8, 8, [1, 2], [0.5, 0.5], causal), 32)
    q, k, v = _planted(p.layout, p.attend, Hq=2, Hkv=1)
    want = attnlang.compile(p, backend="reference")(q, k, v)
    monkeypatch.setattr(torch_path, "run", None)  # the torch path's attention must not run
    torch.testing.assert_close(attnlang.compile(p, backend="triton")(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_other_among_refused_with_reason():
    p = Pattern.create(pyramid(8, 8, [1, 2], [0.5, 0.5], causal & sliding(9)), 32)
    q = torch.randn(1, 1, 32, 16)
    why = triton_backend.supports(check_call(p, q, q, q, None, {}, None))
    assert "causal & sliding(9)" in why and "backend='torch'" in why
    with pytest.raises(AttnError, match="backend='torch'"):
        attnlang.compile(p, backend="triton")(q, q, q)


@settings(max_examples=5, deadline=None)
@given(pyramids(), st.integers(0, 1000))
def test_random_pyramids(p, seed):
    # test_pyramid's strategy: random 1-D/2-D layouts, boxes, levels dividing every block, keep
    # fractions, among full or causal.
    check(p, H=2, Hkv=1, seed=seed)
