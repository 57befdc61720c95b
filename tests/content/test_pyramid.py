"""pyramid(...) (PSA, docs/language.md §13.2): selection, reference, torch path, diagnostics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.errors import AttnError
from attnlang.pattern import Causal, Full, Layout, Pattern, Pyramid, causal, full, pyramid
from attnlang.pattern import block_sizes
from attnlang.pyramid import level_table
from strategies import exprs, layouts


def _planted(layout: Layout, p: Pyramid, B=1, Hq=2, Hkv=1, D=8, seed=0):
    """Q/K whose block scores are well separated (no near ties), V random."""
    g = torch.Generator().manual_seed(seed)
    kids = attnlang.pattern.box_ids(layout.coords(np.arange(layout.n)), p.block, layout.sizes)
    nk = int(kids.max()) + 1
    u = torch.randn(D, generator=g)
    strength = torch.randperm(nk, generator=g).float() * (1.5 / nk) - 0.75  # distinct, |k| ~ 1
    k = strength[torch.from_numpy(kids)][None, None, :, None] * u + 0.05 * torch.randn(B, Hkv, layout.n, D, generator=g)
    sign = torch.tensor([1.0, -1.0] * Hq)[:Hq]  # heads disagree, so their selections differ
    q = sign[None, :, None, None] * u + 0.3 * torch.randn(B, Hq, layout.n, D, generator=g)
    v = torch.randn(B, Hkv, layout.n, D, generator=g)
    return q, k, v


def _dense(expr, layout, q, k, v):
    return attnlang.compile(Pattern.create(expr, layout), backend="reference")(q, k, v, return_lse=True)


# --- construction by hand, independent of attnlang.pyramid -----------------------------------

def _float64_psa(p: Pyramid, layout: Layout, q, k, v, scale):
    """PSA written out per query token in float64 with plain loops (small sizes only)."""
    q, k, v = (x.double().numpy() for x in (q, k, v))
    n = layout.n
    coords = [tuple(int(c) for c in xs) for xs in zip(*layout.coords(np.arange(n)))]

    def cells(box):
        ids = {}
        for t, c in enumerate(coords):
            ids.setdefault(tuple(ci // b for ci, b in zip(c, box)), []).append(t)
        return [ids[key] for key in sorted(ids)]  # row-major box order, tokens in flat order

    groups, blocks = cells(p.query_block), cells(p.block)
    among = p.among
    idx = np.arange(n)
    allow = np.broadcast_to(among.allowed(layout.points(idx[:, None]), layout.points(idx[None, :]),
                                          attnlang.pattern.Env(layout)), (n, n))
    B, H = q.shape[:2]
    G = H // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            kk, vv = k[b, h // G], v[b, h // G]
            for members in groups:
                mq = q[b, h, members].mean(axis=0)
                elig = [j for j, blk in enumerate(blocks) if allow[np.ix_(members, blk)].any()]
                score = {j: scale * mq @ kk[blocks[j]].mean(axis=0) for j in elig}
                ranked = sorted(elig, key=lambda j: (-score[j], j))
                lvl, cum, lo = {}, 0.0, 0
                for lv, f in zip(p.levels, p.keep):
                    cum += f
                    hi = math.ceil(round(len(ranked) * cum, 9))
                    lvl.update({j: lv for j in ranked[lo:hi]})
                    lo = hi
                for t in members:
                    logits, values = [], []
                    for j, lv in lvl.items():
                        for r in range(0, len(blocks[j]), lv):
                            run = blocks[j][r:r + lv]
                            if allow[t, run].all():
                                logits.append(scale * q[b, h, t] @ kk[run].mean(axis=0) + math.log(lv))
                                values.append(vv[run].mean(axis=0))
                    if logits:
                        w = np.exp(np.array(logits) - max(logits))
                        out[b, h, t] = (w[:, None] * np.array(values)).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("tokens,block,qblock,levels,keep,among", [
    (48, 8, 4, [1, 2, 4], [0.25, 0.25, 0.25], causal),
    (48, 8, 8, [1, 2, 4, 8], [0.1, 0.2, 0.3, 0.4], full),
    ((6, 10), (2, 4), (3, 5), [1, 2], [0.5, 0.3], causal),  # ragged boxes: 8- and 4-token blocks
    ((6, 10), (3, 5), 2, [1, 5], [0.4, 0.6], Causal("w")),
])
def test_reference_and_torch_equal_independent_float64(tokens, block, qblock, levels, keep, among):
    p = Pattern.create(pyramid(block, qblock, levels, keep, among), tokens)
    q, k, v = _planted(p.layout, p.attend, B=2, Hq=4, Hkv=2)
    scale = q.shape[-1] ** -0.5
    want = _float64_psa(p.attend, p.layout, q, k, v, scale)
    for backend in ("reference", "torch"):
        got = attnlang.compile(p, backend=backend)(q, k, v)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=backend)


def test_level_one_everywhere_is_dense():
    for among in (full, causal, causal & attnlang.sliding(9)):
        p = Pattern.create(pyramid((4, 4), (2, 8), levels=[1], keep=[1.0], among=among), (8, 8))
        q, k, v = _planted(p.layout, p.attend)
        for backend in ("reference", "torch"):
            o, l = attnlang.compile(p, backend=backend)(q, k, v, return_lse=True)
            o2, l2 = _dense(among, p.layout, q, k, v)
            torch.testing.assert_close(o, o2, atol=1e-5, rtol=0)
            torch.testing.assert_close(l, l2, atol=1e-5, rtol=0)


@st.composite
def pyramids(draw, with_random_among: bool = False):
    layout = draw(layouts(max_rank=2, max_n=64))
    block = tuple(draw(st.integers(1, L)) for L in layout.sizes)
    qblock = tuple(draw(st.integers(1, L)) for L in layout.sizes)
    common = math.gcd(*block_sizes(layout, block))
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    levels = draw(st.lists(st.sampled_from(divisors), min_size=1, max_size=4))
    # tenths, so the decimals as written sum to at most 1 (keep is exact decimal arithmetic)
    parts = draw(st.lists(st.integers(0, 10), min_size=len(levels), max_size=len(levels)).filter(
        lambda xs: sum(xs) <= 10))
    keep = [x / 10 for x in parts]
    among = draw(exprs(layout, max_leaves=2)) if with_random_among else draw(st.sampled_from([Full(), Causal()]))
    return Pattern.create(Pyramid(block, tuple(keep), qblock, tuple(levels), among), layout)


def _check_torch_equals_reference(p, seed):
    q, k, v = _planted(p.layout, p.attend, B=1, Hq=2, Hkv=1, seed=seed)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
    res = {}
    for backend in ("reference", "torch"):
        o, l = attnlang.compile(p, backend=backend)(q, k, v, return_lse=True)
        grads = torch.autograd.grad((o * do).sum() + torch.where(torch.isinf(l), 0, l).sum(), (q, k, v))
        res[backend] = (o, l) + grads
    for a, b in zip(res["reference"], res["torch"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@given(pyramids(), st.integers(0, 1000))
@settings(max_examples=25)
def test_torch_equals_reference_outputs_and_grads(p, seed):
    _check_torch_equals_reference(p, seed)


@given(pyramids(with_random_among=True), st.integers(0, 1000))
@settings(max_examples=15)
def test_torch_equals_reference_any_among(p, seed):
    _check_torch_equals_reference(p, seed)


@given(pyramids(with_random_among=True), st.integers(0, 1000))
@settings(max_examples=20)
def test_numpy_and_torch_levels_agree(p, seed):
    from attnlang.runtime.call import check_call
    from attnlang.runtime.pyramid import levels

    q, k, v = _planted(p.layout, p.attend, B=1, Hq=4, Hkv=2, seed=seed)
    call = check_call(p, q, k, v, None, {}, planner=None)
    want = level_table(p.attend, p.layout, q[0].numpy(), k[0].numpy(), call.scale)
    np.testing.assert_array_equal(levels(call, 0).numpy(), want)


def test_levels_by_hand():
    # One query group (whole sequence), 4 key blocks of 2; block scores ordered 2 > 0 > 3 > 1.
    p = Pattern.create(pyramid(2, 8, levels=[1, 2], keep=[0.25, 0.5]), 8).attend
    k = np.array([1, 1, -2, -2, 3, 3, -1, -1], dtype=np.float32)[None, :, None]
    q = np.ones((1, 8, 1), dtype=np.float32)
    # n = 4: rank 0 -> level 1, ranks 1..2 -> level 2 (ceil(4 * 0.75) = 3), rank 3 skipped.
    assert level_table(p, Layout.of(8), q, k, 1.0).tolist() == [[[2, 0, 1, 2]]]
    # Ties go to the lower block: all equal scores rank blocks 0, 1, 2, 3.
    assert level_table(p, Layout.of(8), q, np.ones_like(k), 1.0).tolist() == [[[1, 2, 2, 0]]]
    # keep is exact decimal arithmetic: 10 blocks, keep [0.1, 0.2] -> 1 and 2 blocks, not 1 and 3.
    p10 = Pattern.create(pyramid(1, 10, levels=[1, 1], keep=[0.1, 0.2]), 10).attend
    kk = np.arange(10, dtype=np.float32)[None, ::-1, None].copy()
    assert (level_table(p10, Layout.of(10), np.ones((1, 10, 1), np.float32), kk, 1.0) > 0).sum() == 3


def test_causal_visibility_of_pooled_runs():
    # Block of 4 at level 4 is one pooled key: visible only from its last token on (causal).
    p = Pattern.create(pyramid(4, 1, levels=[4], keep=[1.0], among=causal), 8)
    q, k, v = _planted(p.layout, p.attend, Hq=1)
    _, lse = attnlang.compile(p, backend="torch")(q, k, v, return_lse=True)
    assert torch.isinf(lse[0, 0, :3]).all() and torch.isfinite(lse[0, 0, 3:]).all()


def test_round_trip_and_prelude():
    src = """
pattern video(T = 4, H = 8, W = 8) {
    tokens t[T], h[H], w[W]
    attend psa(block = (1, 4, 4), query_block = (1, 4, 4))
}"""
    p = attnlang.parse(src).instantiate("video")
    assert isinstance(p.attend, Pyramid)
    again = attnlang.parse(p.to_attn()).instantiate(p.name)
    assert again.attend == p.attend and again.layout == p.layout


@pytest.mark.parametrize("body,message,col", [
    ("pyramid(block = 12, levels = [1, 8], keep = [0.5, 0.5])", "level 8 does not divide the block token count", 12),
    ("pyramid(block = 8, levels = [1, 2], keep = [0.7, 0.4])", "sums to 1.1, more than 1", 12),
    ("pyramid(block = 8, levels = [1, 2], keep = [0.5])", "2 levels [1, 2] but 1 keep", 12),
    ("pyramid(block = 8, keep = [0.1, 0.1, 0.1, 0.1]) & causal", "must be the whole attend expression", 12),
    ("causal | pyramid(block = 8, keep = [0.1, 0.1, 0.1, 0.1])", "must be the whole attend expression", 12),
    ("~pyramid(block = 8, keep = [0.1, 0.1, 0.1, 0.1])", "must be the whole attend expression", 12),
    ("pyramid(block = (8, 8), keep = [0.1, 0.1, 0.1, 0.1])", "has 2 entries but the layout", 12),
    ("pyramid(block = 8, keep = [0.1, 2.0, 0.1, 0.1])", "entries outside 0..1", 12),
    ("pyramid(block = 8, levels = 2, keep = [1.0])", "must be a list of integers", 40),
    ("pyramid(block = 8, keep = [0.5, 0.5, 0, 0], among = 3)", "must be a pattern expression", 64),
])
def test_diagnostics(body, message, col):
    src = f"pattern p {{\n    tokens n[100]\n    attend {body}\n}}\n"
    with pytest.raises(AttnError) as e:
        attnlang.parse(src).instantiate("p")
    d = e.value.diagnostics[0]
    assert message in d.message, d.message
    assert (d.span.line, d.span.col) == (3, col)


def test_pyramid_has_no_mask_and_other_backends_refuse():
    from attnlang.pattern import sliding

    p = Pattern.create(pyramid(8, levels=[1], keep=[0.5]), 64)
    with pytest.raises(AttnError, match="no boolean mask"):
        p.mask()
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(AttnError, match="backend='torch'"):
        attnlang.compile(p, backend="flex")(q, q, q)
    # triton runs pyramids over full / causal among (tests/runtime/test_triton_pyramid.py); any other
    # among is refused, whether or not this session interprets Triton on the CPU (the Triton
    # test modules set TRITON_INTERPRET=1 for the whole session; unsetting it here would make
    # later kernels compile instead of interpret)
    windowed = Pattern.create(pyramid(8, levels=[1], keep=[0.5], among=causal & sliding(9)), 64)
    with pytest.raises(AttnError, match="backend='torch'"):
        attnlang.compile(windowed, backend="triton")(q, q, q)
    assert attnlang.compile(p)(q, q, q).shape == q.shape  # the default picks the torch path


@pytest.mark.parametrize("among", [full, causal])
def test_fused_cpu_path_outputs_and_grads(among):
    # Without return_lse the torch path uses PyTorch's fused CPU flash kernel per chunk.
    p = Pattern.create(pyramid((2, 4), (4, 2), [1, 2, 4], [0.3, 0.3, 0.2], among), (8, 12))
    q, k, v = (x.requires_grad_() for x in _planted(p.layout, p.attend, Hq=4, Hkv=2))
    res = {}
    for backend in ("reference", "torch"):
        o = attnlang.compile(p, backend=backend)(q, k, v)
        res[backend] = (o,) + torch.autograd.grad((o * o).sum(), (q, k, v))
    for a, b in zip(res["reference"], res["torch"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_plan_lists_exactly_the_tiles_with_pooled_keys():
    from attnlang.planner import make_plan
    from attnlang.pyramid import pattern_content, token_structure

    p = Pattern.create(pyramid((2, 4), (4, 2), [1, 2], [0.3, 0.3], causal), (8, 12))
    q, k, _ = _planted(p.layout, p.attend, Hq=2)
    content = pattern_content(p, q[0].numpy(), k[0].numpy())
    plan = make_plan(p, content=content, block_m=32, block_n=16)
    assert np.array_equal(plan.levels, content[p.attend])
    for h in range(2):
        level, _ = token_structure(p.attend, p.layout, plan.levels[h])
        touched = np.add.reduceat(np.add.reduceat(level > 0, np.arange(0, 96, 32), 0), np.arange(0, 96, 16), 1) > 0
        assert np.array_equal(plan.tile_map(h) > 0, touched)
    with pytest.raises(AttnError, match="planned per call"):
        make_plan(p)


@pytest.mark.parametrize("among, tokens", [(causal, 100), (full, 96)])
def test_torch_tiles_hold_exactly_the_pooled_keys(among, tokens):
    """The executor's tiles (one set per level) hold exactly each group's selected virtual keys —
    a block at level l costs 1/l of its keys — and masks only pairs that may need one: where
    `among` cuts the pair (the diagonal causally; the ragged tail group, whose class the planner
    leaves partial) or the block is ragged (the tail of 100); none with full among on whole boxes."""
    from attnlang.runtime.call import check_call
    from attnlang.runtime.pyramid import _tiles, levels, static_of

    p = Pattern.create(pyramid(8, 8, [1, 2, 4], [0.25, 0.25, 0.25], among), tokens)
    q, k, v = _planted(p.layout, p.attend, Hq=4, Hkv=2)
    call = check_call(p, q, k, v, None, {}, planner=None)
    st, table = static_of(p, "cpu"), levels(call, 0).numpy()
    h, g, j = np.nonzero(table)
    size = np.diff(st.kstart)
    want = int((st.qsize.numpy()[g] * size[j] // table[h, g, j]).sum())
    may = int((((g == j) | (g == st.nq - 1)) & (among is causal) | (size[j] < 8)).sum())
    work = masked = 0
    for tl in _tiles(call, st, [table]):
        rows = (tl.q_rows != q[..., 0].numel()).view(tl.count, tl.block_m).sum(1)
        work += int((rows * (tl.k_rows != tl.k_sink).sum(1)).sum())
        masked += len(tl.slot_tile)
    assert work == want and masked <= may and (masked > 0) == (among is causal)
