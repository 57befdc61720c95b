"""The Triton routing kernels (runtime/triton_routing.py) under the CPU interpreter make the numpy
oracle's decisions (attnlang/routing.py): 1-D runs, ragged ends, 2-D/3-D boxes, causal `among`,
fewer eligible blocks than `top`, exact ties, `scope = head`, PBS permutation, GQA; and the
triton backend routes with them end to end. Shapes stay tiny (interpreter)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402

pytest.importorskip("triton")

from attnlang import routing as oracle  # noqa: E402
from attnlang.pattern import Pattern, block, causal, route  # noqa: E402
from attnlang.runtime import reference  # noqa: E402
from attnlang.runtime import triton as triton_backend  # noqa: E402
from attnlang.runtime import triton_routing  # noqa: E402
from attnlang.runtime.call import check_call  # noqa: E402
from test_route_family import planted, routed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SCALE = 0.3


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def kernel_content(p, q, k):
    out = {}
    for r in oracle.routes(p):
        out.update(triton_routing.route_content(r, p.layout, q, k, SCALE))
    return out


def assert_same(p, q, k):
    """Kernel decisions (and PBS perm/pos) equal the oracle's; returns the selection."""
    want = oracle.pattern_content(p, q.numpy(), k.numpy(), SCALE)
    got = kernel_content(p, q, k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    return want[oracle.routes(p)[0]]


def clear_margins(p, q, k, scale=SCALE, eps=1e-6) -> bool:
    """No decision of the oracle for one batch item (``q [Hq, N, D]``) sits within rounding of
    its cut: at the ``top``/threshold cut the two neighbouring scores differ by more than
    ``eps`` (relative), and no cumulative softmax mass short of the whole row is within ``eps``
    of tau. The kernels sum in another order than numpy, so such near-ties may go either way.
    ``threshold = 1`` has no cut: it keeps every eligible block (``attnlang.routing.threshold_cut``)."""
    q, k = q.detach().float(), k.detach().float()
    content = oracle.pattern_content(p, q.numpy(), k.numpy(), scale)
    for r in oracle.routes(p):
        qf, kf = q.numpy().astype(np.float32), k.numpy().astype(np.float32)
        Hq, lay = qf.shape[0], p.layout
        G, nb = r.groups(lay), r.blocks(lay)
        kv_of = np.arange(Hq) // (Hq // kf.shape[0])
        qm = oracle.segment_mean(qf, oracle.group_ids(r, lay), G)
        if r.permute is None:
            km = oracle.segment_mean(kf, oracle.block_ids(r, lay), nb)[kv_of]
            elig = np.broadcast_to(oracle.eligibility(r, lay), (Hq, G, nb))
        else:
            perm = content[(r, "perm")]
            km = oracle.segment_mean(kf[kv_of], content[(r, "pos")] // r.block[0], nb)
            elig = oracle.eligibility_permuted(r, lay, perm)
        s = np.einsum("hgd,hbd->hgb", qm, km).astype(np.float64) * scale
        sel = content[r]
        if r.scope == "head":
            s, elig, sel = (x.transpose(0, 2, 1).reshape(Hq, 1, -1) for x in (s, elig, sel))
        for row_s, row_e, row_sel in zip(s.reshape(-1, s.shape[-1]), elig.reshape(-1, s.shape[-1]),
                                         sel.reshape(-1, s.shape[-1])):
            v = -np.sort(-row_s[row_e])
            c = int(row_sel.sum())
            if 0 < c < len(v) and v[c - 1] - v[c] <= eps * (1 + abs(v[c])):
                return False
            if r.threshold is not None and r.threshold < 1 and len(v):
                mass = np.cumsum(np.exp(v - v[0]) / np.exp(v - v[0]).sum())
                if np.any(np.abs(mass[:-1] - r.threshold) <= eps):  # the whole row is taken anyway
                    return False
    return True


CASES = {
    # MoBA: earlier blocks only, its own block excluded (among = causal - block), top fewer
    # than the eligible blocks late in the sequence and more than them early on
    "moba_1d": (causal & (block(8) | route(8, top=2, among=causal - block(8))), 44, (2, 1)),
    "threshold_ragged_1d": (route(12, threshold=0.5, query_block=8), 44, (2, 1)),
    "causal_among_top_over_eligible": (route(8, top=6, among=causal, query_block=4), 40, (2, 2)),
    "biformer_2d_boxes": (route((2, 4), top=2, query_block=(2, 4)), (5, 9), (2, 1)),
    "biformer_2d_unlike_boxes": (route((3, 2), threshold=0.7, query_block=(2, 3)), (7, 5), (4, 2)),
    "vmoba_3d_boxes": (block((2, 2, 3)) | route((2, 2, 3), threshold=0.3), (3, 5, 7), (2, 1)),
    "vmoba_3d_head_scope": (route((2, 3, 2), threshold=0.25, scope="head"), (3, 4, 5), (2, 2)),
    "head_scope_top_causal": (causal & route((2, 2), top=1, scope="head", among=causal), (4, 6), (2, 1)),
    "pbs_permuted": (causal & (block(8) | route(8, threshold=0.9, among=causal, query_block=8,
                                                permute_keys=16)), 50, (4, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_equal_oracle(name):
    expr, tokens, (H, Hkv) = CASES[name]
    p = Pattern.create(expr, tokens=tokens)
    q, k, _ = planted(3, H, Hkv, p.n)
    assert clear_margins(p, q[0], k[0])
    sel = assert_same(p, q[0], k[0])
    assert sel.any() and not sel.all()  # a real selection, not a degenerate one


def test_exact_ties_go_to_the_lower_block():
    """All scores equal (zero Q): ties by block, then group (scope = head); the threshold mass
    of equal scores is summed in the same order as the oracle's, so even its cut agrees."""
    for r in (route(6, top=2, among=causal), route(6, threshold=0.5, among=causal),
              route((2, 3), top=1, scope="head"), route((2, 3), threshold=0.4, scope="head")):
        p = Pattern.create(r, tokens=30 if isinstance(r.block, int) else (4, 6))
        q, k = torch.zeros(1, p.n, 8), torch.randn(1, p.n, 8)
        sel = assert_same(p, q, k)
        if r.top == 2:  # each group: its first two eligible blocks
            first = np.minimum(np.arange(30) // 6 + 1, 2)
            assert np.array_equal(sel[0].sum(-1), first) and sel[0, :, :2][sel[0].sum(-1) == 2].all()


def test_threshold_extremes():
    q, k, _ = planted(5, 2, 1, 40)
    for tau, want in ((1.0, "all"), (1e-6, "one")):
        p = Pattern.create(route(8, threshold=tau, among=causal), tokens=40)
        sel = assert_same(p, q[0], k[0])
        count = np.minimum(np.arange(40) // 8 + 1, 5)
        assert np.array_equal(sel.sum(-1), np.broadcast_to(count if want == "all" else 1, (2, 40)))


def test_threshold_one_keeps_a_long_tail():
    """threshold = 1 keeps every eligible block even where the float running sum of a long tail
    of tiny probabilities reaches 1 early (the oracle agrees: attnlang.routing.threshold_cut)."""
    n = 128
    q, k = torch.zeros(2, n, 8), torch.zeros(1, n, 8)
    q[..., 0] = 1.0
    k[0, :, 0] = -torch.arange(n, dtype=torch.float32) * 0.6
    p = Pattern.create(route(4, threshold=1.0, among=causal), tokens=n)
    sel = assert_same(p, q, k)
    assert np.array_equal(sel, np.broadcast_to(oracle.eligibility(p.attend, p.layout), sel.shape))


def test_wide_rows_take_the_scores_path(monkeypatch):
    """Rows wider than SELECT_BLOCKS: the kernel writes scores, the torch sort selects."""
    monkeypatch.setattr(triton_routing, "SELECT_BLOCKS", 2)
    for r in (route(4, top=2, among=causal), route((2, 2), threshold=0.6, query_block=(2, 3))):
        p = Pattern.create(r, tokens=36 if isinstance(r.block, int) else (5, 6))
        q, k, _ = planted(6, 2, 1, p.n)
        assert clear_margins(p, q[0], k[0])
        assert_same(p, q[0], k[0])


def test_fp16_inputs_pool_in_fp32():
    p = Pattern.create(route((2, 2), top=2, query_block=(2, 2)), tokens=(6, 6))
    q, k, _ = planted(8, 2, 1, p.n)
    q, k = q.half(), k.half()
    assert clear_margins(p, q[0].float(), k[0].float())
    want = oracle.pattern_content(p, q[0].float().numpy(), k[0].float().numpy(), SCALE)
    assert np.array_equal(kernel_content(p, q[0], k[0])[p.attend], want[p.attend])


@settings(max_examples=12, deadline=None)
@given(routed())
def test_random_routes_equal_oracle(case):
    # The route engineer's strategy: random blocks, boxes, among, top/threshold, scope, permute.
    p, (H, Hkv), seed = case
    q, k, _ = planted(seed, H, Hkv, p.n)
    assume(clear_margins(p, q[0], k[0]))
    assert_same(p, q[0], k[0])


def test_triton_backend_routes_with_the_kernels(monkeypatch):
    """End to end: the triton backend takes its decisions from the kernels, and its output,
    lse and gradients equal the reference backend's (which routes with the numpy oracle)."""
    calls = []
    monkeypatch.setattr(triton_routing, "route_content",
                        lambda *a, real=triton_routing.route_content: calls.append(1) or real(*a))
    p = Pattern.create(route((2, 4), top=2, query_block=(2, 4)) | causal & block((2, 4)), (4, 8))
    q, k, v = planted(9, 2, 1, p.n, D=16)
    res = []
    for backend in (triton_backend, reference):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = backend.run(check_call(p, qq, kk, vv, None, {}, None))
        res.append((out, lse, *torch.autograd.grad((out * torch.cos(out)).sum() + lse.sum(), (qq, kk, vv))))
    assert calls, "the triton backend did not route with the kernels"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
