"""route(...) (docs/language.md §13.1): selection oracle, dense reference, call-time plans, the torch
backend, prelude families, §6.3 partitions by layer, and diagnostics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.errors import AttnError
from attnlang.pattern import Pattern, block, causal, full, route, sliding
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.routing import pattern_content, routes


def planted(seed: int, H: int, Hkv: int, n: int, D: int = 8):
    """Q/K with per-token structure so block scores are well separated (no accidental ties)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((1, 1, D))
    q = rng.standard_normal((1, H, n, D)) * 0.5 + rng.standard_normal((1, H, n, 1)) * u
    k = rng.standard_normal((1, Hkv, n, D)) * 0.5 + rng.standard_normal((1, Hkv, n, 1)) * 2 * u
    v = rng.standard_normal((1, Hkv, n, D))
    return [torch.tensor(x, dtype=torch.float32) for x in (q, k, v)]


@st.composite
def routed(draw):
    rank = draw(st.integers(1, 3))
    sizes = tuple(draw(st.integers(2, 40 if rank == 1 else 7)) for _ in range(rank))
    B = tuple(draw(st.integers(1, L)) for L in sizes)
    kind = draw(st.sampled_from(["one", "same", "free"]))
    Bq = 1 if kind == "one" else B if kind == "same" else tuple(draw(st.integers(1, L)) for L in sizes)
    among = draw(st.sampled_from(["full", "causal", "causal-block"]))
    among = {"full": full, "causal": causal, "causal-block": causal - block(B)}[among]
    if draw(st.booleans()):
        sel = dict(top=draw(st.integers(1, 6)))
    else:
        sel = dict(threshold=draw(st.sampled_from([1e-6, 0.05, 0.3, 0.7, 0.999, 1.0])))
    scope = draw(st.sampled_from(["query", "head"]))
    permute = draw(st.sampled_from([None, 1, 3, 8])) if rank == 1 else None
    r = route(B, among=among, query_block=Bq, scope=scope, permute_keys=permute, **sel)
    outer = draw(st.sampled_from(["alone", "or-block", "causal-and"]))
    e = {"alone": r, "or-block": block(B) | r, "causal-and": causal & (block(B) | r)}[outer]
    heads = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    return Pattern.create(e, tokens=sizes), heads, draw(st.integers(0, 2**31 - 1))


def dense64(p, q, k, v):
    """Float64 attention under the pattern's dense mask (the selection from the numpy oracle):
    ``(out, lse)``, differentiable; rows with no allowed key give 0 and -inf."""
    H, Hkv = q.shape[1], k.shape[1]
    scale = 1.0 / np.sqrt(q.shape[-1])
    m = torch.from_numpy(p.mask(heads=H, content=pattern_content(p, q[0].detach().numpy(), k[0].detach().numpy())))
    k2, v2 = (x.double().repeat_interleave(H // Hkv, dim=1) for x in (k, v))
    s = (q.double() @ k2.transpose(-1, -2) * scale).masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p_ = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p_ @ v2, lse


@settings(max_examples=30, deadline=None)
@given(routed())
def test_torch_backend_equals_dense_reference_with_grads(case):
    """Outputs against the reference backend; gradients against float64 dense attention (both
    fp32 backends differ from it by rounding; block = 1 routes merge one key per piece)."""
    p, (H, Hkv), seed = case
    q, k, v = planted(seed, H, Hkv, p.n)
    res = []
    for backend in ("reference", "torch", "float64"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        if backend == "float64":
            out, lse = dense64(p, qq, kk, vv)
        else:
            out, lse = attnlang.compile(p, backend=backend)(qq, kk, vv, return_lse=True)
        grads = torch.autograd.grad((out * torch.sin(out)).sum(), (qq, kk, vv))
        res.append((out, lse, grads))
    (o1, l1, _), (o2, l2, g2), (_, _, g64) = res
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g2, g64):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(routed())
def test_routed_fast_path_equals_generic_plan(case):
    """runtime/routed.py (static part + routed key blocks) against the generic per-call plan."""
    from attnlang.runtime import routed as fast

    p, (H, Hkv), seed = case
    q, k, v = planted(seed, H, Hkv, p.n)
    res = []
    for use in (True, False):
        fast.USE_FAST = use
        try:
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out, lse = attnlang.compile(p, backend="torch")(qq, kk, vv, return_lse=True)
            grads = torch.autograd.grad((out * torch.sin(out)).sum() + lse[torch.isfinite(lse)].sum(), (qq, kk, vv))
        finally:
            fast.USE_FAST = True
        res.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = res
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 30), st.sampled_from(["normal", "ties", "zeros", "large"]),
       st.sampled_from([1.0, 0.7, 0.1, 0.0]), st.booleans(),
       st.sampled_from([1e-9, 0.1, 0.25, 1 / 3, 0.5, 0.9, 0.999999, 1.0]), st.integers(0, 2**31 - 1))
def test_torch_stage_head_threshold_is_the_oracle_bit_for_bit(H, G, nb, kind, density, shared, tau, seed):
    """runtime/routing.head_threshold (partial sort, pairwise sum in pieces) against the oracle's
    whole-head sort: the same pairs, with ties, equal scores (cuts at exact fractions), ineligible
    pairs and thresholds near 0 and 1; small pieces so the pairwise recursion runs."""
    from attnlang.routing import select
    from attnlang.runtime import routing as torch_routing

    rng = np.random.default_rng(seed)
    s = {"normal": rng.standard_normal((H, G, nb)), "ties": rng.integers(-2, 3, (H, G, nb)),
         "zeros": np.zeros((H, G, nb)), "large": rng.standard_normal((H, G, nb)) * 30}[kind].astype(np.float32)
    e = rng.random((1 if shared else H, G, nb)) < density
    leaf = torch_routing.LEAF
    torch_routing.LEAF = 128
    try:
        got = torch_routing.head_threshold(s, e, tau)
    finally:
        torch_routing.LEAF = leaf
    assert np.array_equal(got, select(route(1, threshold=tau, scope="head"), s, e))


@pytest.mark.parametrize("tau", [1e-6, 0.25, 0.999999, 1.0])
def test_vmoba_per_token_rows_on_ragged_boxes(tau):
    """Per-token routing with scope = head on boxes that do not divide the axes, as one row per
    (token, block) merged chunk by chunk: outputs, lse and gradients against float64 dense."""
    p = attnlang.parse(f"pattern p {{ tokens t[5], h[6], w[7]\n attend vmoba((2, 4, 4), {tau}) }}").instantiate("p")
    q, k, v = planted(7, 2, 1, p.n)
    res = []
    for backend in ("torch", "float64"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = dense64(p, qq, kk, vv) if backend == "float64" else \
            attnlang.compile(p, backend=backend)(qq, kk, vv, return_lse=True)
        res.append((out, lse, torch.autograd.grad((out * torch.sin(out)).sum() + lse.sum(), (qq, kk, vv))))
    (o1, l1, g1), (o2, l2, g2) = res
    torch.testing.assert_close(o1, o2.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2.float(), atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("slack", [0.0, 20.0])
def test_merge_of_pieces_far_apart(slack):
    """Pieces of one query whose lse differ by far more than the merge's slack (large logits,
    every block selected): the running reference must move and rescale the sums exactly; with
    slack 0 it moves on every larger piece."""
    from attnlang.runtime import tilesets as fast  # the merge of the tile-set attention

    p = Pattern.create(block(8) | route(8, top=7), tokens=64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    q, k = q * 6, k * 6
    moved, merge, old = [], fast._merge, fast.MERGE_SLACK

    def spy(m, den, num, dest, o, lse):
        moved.append(int(((lse > m.index_select(0, dest) + 20) & (m.index_select(0, dest) > -np.inf)).sum()))
        merge(m, den, num, dest, o, lse)

    fast._merge, fast.MERGE_SLACK = spy, slack
    res = []
    try:
        for backend in ("torch", "float64"):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out, lse = dense64(p, qq, kk, vv) if backend == "float64" else \
                attnlang.compile(p, backend=backend)(qq, kk, vv, return_lse=True)
            res.append((out, lse, torch.autograd.grad((out * torch.sin(out)).sum(), (qq, kk, vv))))
    finally:
        fast._merge, fast.MERGE_SLACK = merge, old
    assert sum(moved) > 50  # pieces far above the first one of their row
    (o1, l1, g1), (o2, l2, g2) = res
    torch.testing.assert_close(o1, o2.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l1, l2.float(), atol=1e-4, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.float(), atol=1e-3, rtol=1e-3)


def test_prelude_families_take_the_fast_path():
    from attnlang.runtime.routed import split

    for src in ("examples/moba.attn", "examples/pbs.attn", "examples/vmoba.attn", "examples/biformer.attn"):
        mod = attnlang.parse(src)
        assert split(mod.instantiate(mod.names[0])) is not None, src
    assert split(Pattern.create(causal - route(8, top=1), tokens=32)) is None  # negated: generic plan


@settings(max_examples=25, deadline=None)
@given(routed(), st.sampled_from([(16, 16), (32, 16), (16, 64)]))
def test_call_time_plan_is_exact_per_head(case, tiles):
    p, (H, Hkv), seed = case
    q, k, _ = planted(seed, H, Hkv, p.n)
    content = pattern_content(p, q[0].numpy(), k[0].numpy())
    masks = p.mask(heads=H, content=content)
    plan = make_plan(p, content=content, block_m=tiles[0], block_n=tiles[1])
    assert len(plan.groups) == H
    for h in range(H):
        want = Plan.from_mask(p, masks[h:h + 1], *tiles).tile_map(0)
        assert np.array_equal(plan.tile_map(h), want)


def test_moba_current_block_is_always_attended_and_top_counts_it():
    p = attnlang.parse("pattern m { tokens n[256]\n attend moba(size = 32, top = 3) }").instantiate("m")
    q, k, _ = planted(1, 2, 2, 256)
    m = p.mask(heads=2, content=pattern_content(p, q[0].numpy(), k[0].numpy()))
    qi, ki = np.arange(256)[:, None], np.arange(256)[None, :]
    assert m[:, (ki <= qi) & (ki // 32 == qi // 32)].all()  # own block, causally
    assert not m[:, ki > qi].any()
    blocks = m.reshape(2, 256, 8, 32).any(-1).sum(-1)  # blocks seen per query
    assert (blocks == np.minimum(np.arange(256) // 32 + 1, 3)).all()


def test_biformer_routes_whole_regions():
    p = attnlang.parse("examples/biformer.attn").instantiate("biformer_stage3")
    q, k, _ = planted(2, 2, 1, p.n)
    m = p.mask(heads=2, content=pattern_content(p, q[0].numpy(), k[0].numpy()))
    r = m.reshape(2, 7, 2, 7, 2, 7, 2, 7, 2)  # [h, qrh, qh, qrw, qw, krh, kh, krw, kw]
    region = r.transpose(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(2, 49, 49, 16)
    assert (region.all(-1) == region.any(-1)).all()  # each region pair all or nothing
    assert (region.any(-1).sum(-1) == 16).all()  # top 16 regions per query region


def test_pbs_segment_one_equals_no_permutation():
    base = dict(threshold=0.6, among=causal, query_block=8)
    p1 = Pattern.create(causal & (block(8) | route(8, permute_keys=1, **base)), tokens=96)
    p0 = Pattern.create(causal & (block(8) | route(8, **base)), tokens=96)
    q, k, _ = planted(3, 2, 1, 96)
    m1 = p1.mask(heads=2, content=pattern_content(p1, q[0].numpy(), k[0].numpy()))
    m0 = p0.mask(heads=2, content=pattern_content(p0, q[0].numpy(), k[0].numpy()))
    assert np.array_equal(m1, m0)


def test_permuted_blocks_hold_the_most_important_keys():
    p = Pattern.create(route(4, top=1, permute_keys=16), tokens=32)
    q, k, _ = planted(4, 1, 1, 32)
    c = pattern_content(p, q[0].numpy(), k[0].numpy())
    perm = c[(p.attend, "perm")][0]
    assert sorted(perm[:16]) == list(range(16)) and sorted(perm[16:]) == list(range(16, 32))
    s = q[0, 0, -4:].numpy() @ k[0, 0].numpy().T / np.sqrt(8)
    imp = (np.exp(s - s.max(1, keepdims=True)) / np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)).mean(0)
    assert (np.diff(imp[perm[:16]]) <= 1e-7).all()


def test_threshold_one_selects_every_eligible_block_and_top_beyond_eligible():
    q, k, _ = planted(5, 1, 1, 64)
    for r in (route(8, threshold=1.0, among=causal), route(8, top=100, among=causal)):
        p = Pattern.create(r, tokens=64)
        m = p.mask(content=pattern_content(p, q[0].numpy(), k[0].numpy()))[0]
        qi, ki = np.arange(64)[:, None], np.arange(64)[None, :]
        assert np.array_equal(m, ki // 8 <= qi // 8)  # all eligible blocks (causal among)


def test_scope_head_keeps_top_times_groups_pairs():
    p = Pattern.create(route(8, top=2, query_block=8, scope="head"), tokens=64)
    q, k, _ = planted(6, 2, 1, 64)
    sel = pattern_content(p, q[0].numpy(), k[0].numpy())[p.attend]
    assert sel.shape == (2, 8, 8) and (sel.sum((1, 2)) == 16).all()
    assert (sel.sum(2) != 2).any()  # joint: groups get different counts


def test_vmoba_partition_by_layer_cycles():
    mod = attnlang.parse("examples/vmoba.attn")
    parts = [mod.instantiate("vmoba_video", {"layer": l}).attend.items[1].block for l in range(4)]
    assert parts == [(1, 30, 52), (16, 6, 13), (2, 6, 13), (1, 30, 52)]
    small = "pattern v(layer = 0) {\n tokens t[4], h[6], w[5]\n let part = [(1, 6, 5), (4, 3, 2), (2, 3, 2)][layer % 3]\n attend vmoba(part)\n}"
    q, k, v = planted(7, 2, 2, 120)
    for layer in range(3):
        fn = attnlang.compile(small, layer=layer, backend="torch")
        ref = attnlang.compile(small, layer=layer, backend="reference")
        torch.testing.assert_close(fn(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_prelude_round_trips_through_text():
    for src in ("examples/moba.attn", "examples/pbs.attn", "examples/vmoba.attn", "examples/biformer.attn"):
        p = attnlang.parse(src).instantiate(attnlang.parse(src).names[0])
        again = attnlang.parse(p.to_attn()).instantiate(p.name)
        assert again.attend == p.attend and again.layout == p.layout


def test_pattern_without_content_says_how_to_get_it():
    p = Pattern.create(route(8, top=1), tokens=32)
    with pytest.raises(AttnError, match="reads Q/K content"):
        p.mask()
    with pytest.raises(AttnError, match="planned per call"):
        make_plan(p)


def test_triton_and_flex_refuse_with_a_reason():
    from attnlang.runtime import flex, triton
    from attnlang.runtime.call import check_call

    p = Pattern.create(route(8, top=1), tokens=32)
    q = torch.randn(1, 1, 32, 8)
    call = check_call(p, q, q, q, None, {}, None)
    # triton runs route (tests/runtime/test_triton_interp.py); on CPU only under TRITON_INTERPRET=1
    assert triton.supports(call) is None or "TRITON_INTERPRET" in triton.supports(call)
    assert "backend='torch'" in flex.supports(call)


@pytest.mark.parametrize("src, words", [
    ("tokens h[8], w[8]\n attend route(block = (2, 2, 2), top = 1)", "has 3 entries but the layout"),
    ("tokens n[64]\n attend route(block = 8, threshold = 1.5)", "threshold = 1.5 is outside (0, 1]"),
    ("tokens n[64]\n attend route(block = 8, threshold = 0)", "threshold = 0.0 is outside (0, 1]"),
    ("tokens n[64]\n attend route(block = 8, top = 0)", "top = 0 must be an integer >= 1"),
    ("tokens n[64]\n attend route(block = 8, top = 2, threshold = 0.5)", "exactly one of top"),
    ("tokens n[64]\n attend route(block = 8)", "exactly one of top"),
    ("tokens h[8], w[8]\n attend route(block = 2, top = 1, permute_keys = importance(segment = 4))",
     "permute_keys needs a 1-D layout"),
    ("tokens n[64]\n attend route(block = 8, top = 1, scope = heads)", "did you mean 'head'"),
    ("tokens n[64]\n attend route(block = 8, top = 1, permute_keys = 3)", "none or importance"),
    ("tokens n[64]\n attend route(block = 80, top = 1)", "outside 1..64"),
    ("tokens n[64]\n attend route(block = 8, top = 1, among = route(block = 4, top = 1))", "must be static"),
])
def test_diagnostics(src, words):
    with pytest.raises(AttnError) as e:
        attnlang.parse(f"pattern p {{\n {src}\n}}").instantiate("p")
    assert words in str(e.value)
    assert "p.attn" not in str(e.value) and "<string>:" in str(e.value)
