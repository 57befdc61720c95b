"""NaN/Inf isolation (docs/reliability.md): an output row, its lse and its dQ depend only on
the keys and values its pattern allows, and dK/dV of a key depend only on the rows that see it.

Property: poison random key rows (NaN, +inf or -inf, in K, V or both, in one entry or the whole
row); every row that sees no poisoned key, and every key seen only by such rows, must get
exactly what it gets when the poison is replaced by finite values, and be finite. The loss
squares the output, so NaN rows also send NaN back through dO (as a real loss would).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.pattern import Pattern, causal, same, sliding, valid
from attnlang.runtime import chunks, flex, reference, torch_exec
from attnlang.runtime.call import check_call
from attnlang.runtime.nonfinite import masked_mm
from strategies import patterns
from test_backends import oracle_planner, random_order

TOL = dict(atol=1e-5, rtol=1e-5)
POISONS = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def poisons(draw, n: int):
    """``[(key, "k" | "v" | "kv", value, whole_row)]``: one to three poisoned keys."""
    keys = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True))
    return [(key, draw(st.sampled_from(["k", "v", "kv"])), draw(POISONS), draw(st.booleans())) for key in keys]


def poisoned(q, k, v, spots, seed: int = 0):
    """``(k, v)`` poisoned at ``spots`` and ``(k, v)`` with the same entries set to other
    finite values (what the clean rows must not notice)."""
    kp, vp, kc, vc = k.clone(), v.clone(), k.clone(), v.clone()
    gen = torch.Generator().manual_seed(seed)
    for key, where, val, whole in spots:
        for name, (bad, good) in (("k", (kp, kc)), ("v", (vp, vc))):
            if name in where:
                d = slice(None) if whole else slice(0, 1)
                bad[:, :, key, d] = val
                good[:, :, key, d] = 100 * torch.randn(good[:, :, key, d].shape, generator=gen)
    return kp, vp, kc, vc


def run(mod, p, q, k, v, planner, inputs=None, grads=True):
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    call = check_call(p, q, k, v, None, inputs or {}, planner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = mod.run(call)
    if not grads:
        return out.detach(), lse.detach(), None
    gen = torch.Generator().manual_seed(3)
    go, gl = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    loss = (out * go).sum() + 0.1 * out.square().sum() + (torch.where(torch.isinf(lse), 0.0, lse) * gl).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def check_isolated(mod, p, q, k, v, spots, planner, inputs=None, grads=True):
    """Clean rows and keys equal the run with the poison replaced by finite values."""
    kp, vp, kc, vc = poisoned(q, k, v, spots)
    bad = run(mod, p, q, kp, vp, planner, inputs, grads)
    good = run(mod, p, q, kc, vc, planner, inputs, grads)
    B, H = q.shape[:2]
    masks = torch.from_numpy(p.mask(heads=H, inputs=None if not inputs else
                                    {n: t[0].numpy() for n, t in inputs.items()}))  # [H, N, N]
    keys = sorted({s[0] for s in spots})
    rows = ~masks[:, :, keys].any(-1)  # [H, N]: rows that see no poisoned key
    clean_keys = ~(masks & ~rows[:, :, None]).any(1)  # [H, N]: keys seen by clean rows only
    for name, x, y, sel in (("out", bad[0], good[0], rows), ("lse", bad[1], good[1], rows)):
        x, y = x[:, sel], y[:, sel]
        assert not torch.isnan(x).any() and not torch.isposinf(x).any(), f"{name}: poison leaked"
        torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"{name}: {m}")
    if grads:
        group = H // k.shape[1]
        kv_clean = clean_keys.view(k.shape[1], group, -1).all(1)  # every query head of the kv head
        for name, x, y, sel in (("dq", bad[2][0], good[2][0], rows), ("dk", bad[2][1], good[2][1], kv_clean),
                                ("dv", bad[2][2], good[2][2], kv_clean)):
            x, y = x[:, sel], y[:, sel]
            assert torch.isfinite(x).all(), f"{name}: poison leaked"
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"{name}: {m}")
    return bad


def tensors(n, B=2, H=2, Hkv=1, D=8, Dv=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=gen), torch.randn(B, Hkv, n, D, generator=gen),
            torch.randn(B, Hkv, n, Dv, generator=gen))


# -- the property, per backend ------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(p=patterns(max_n=64, max_leaves=3), data=st.data(), seed=st.integers(0, 99))
def test_reference_isolates(p, data, seed):
    q, k, v = tensors(p.n, seed=seed)
    check_isolated(reference, p, q, k, v, data.draw(poisons(p.n)), oracle_planner(8, 8))


@settings(max_examples=25, deadline=None)
@given(p=patterns(max_n=64, max_leaves=3), data=st.data(), bm=st.sampled_from([8, 16]),
       bn=st.sampled_from([8, 16]), pad=st.integers(0, 9), permute=st.booleans(), fused=st.booleans(),
       dv=st.sampled_from([8, 4]), seed=st.integers(0, 99))
def test_torch_isolates(p, data, bm, bn, pad, permute, fused, dv, seed):
    order = random_order(p.n, pad, seed) if permute else None
    q, k, v = tensors(p.n, H=4, Hkv=2, Dv=dv, seed=seed)
    old, chunks.USE_FUSED = chunks.USE_FUSED, fused
    try:
        check_isolated(torch_exec, p, q, k, v, data.draw(poisons(p.n)), oracle_planner(bm, bn, order))
    finally:
        chunks.USE_FUSED = old


@settings(max_examples=10, deadline=None)
@given(p=patterns(max_n=48, max_leaves=3), data=st.data(), seed=st.integers(0, 99))
def test_flex_isolates(p, data, seed):
    q, k, v = tensors(p.n, seed=seed)
    check_isolated(flex, p, q, k, v, data.draw(poisons(p.n)), oracle_planner(16, 16), grads=False)


DOCS = Pattern.create(causal & same("doc") & valid("len"), 48, inputs={"doc": "ids", "len": "length"})


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 47), max_size=4, unique=True), length=st.integers(0, 48),
       data=st.data(), fused=st.booleans())
def test_runtime_inputs_isolate(cuts, length, data, fused):
    """Packed documents with padding: poison anywhere reaches only its own document's rows."""
    doc = torch.zeros(48, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    inputs = {"doc": doc[None], "len": torch.tensor([length])}
    q, k, v = tensors(48, B=1)
    spots = data.draw(poisons(48))
    planner = lambda pat, inp: attnlang.make_plan(pat, inputs=inp)  # noqa: E731
    old, chunks.USE_FUSED = chunks.USE_FUSED, fused
    try:
        for mod in (reference, torch_exec):
            check_isolated(mod, DOCS, q, k, v, spots, planner, inputs)
    finally:
        chunks.USE_FUSED = old


# -- the reported cases ---------------------------------------------------------------------------

PADDED = Pattern.create(causal & valid("len"), 64, inputs={"len": "length"})


@pytest.mark.parametrize("backend", ["reference", "torch", "flex"])
@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_padding_tail_poison(backend, where):
    """``valid(len)`` with len = 30 and NaN in ``k[30:]`` / ``v[30:]``: the 30 valid rows are
    untouched (torch returned NaN for all of them; every backend leaked ``v``)."""
    q, k, v = tensors(64, B=1)
    spots = [(key, where, float("nan"), True) for key in range(30, 64)]
    mod = {"reference": reference, "torch": torch_exec, "flex": flex}[backend]
    out = check_isolated(mod, PADDED, q, k, v, spots, lambda pat, inputs: attnlang.make_plan(pat, inputs=inputs),
                         {"len": torch.tensor([30])}, grads=backend != "flex")[0]
    assert torch.isfinite(out[:, :, :30]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_one_poisoned_key_stays_local(fused, monkeypatch):
    """One NaN key under a sliding window reaches only the rows of its window (the torch
    executor spread it to every row through the dummy slots that read key tile 0)."""
    monkeypatch.setattr(chunks, "USE_FUSED", fused)
    fn = attnlang.compile(causal & sliding(4), tokens=64, backend="torch")
    q, k, v = tensors(64)
    for key in (0, 40):
        kp = k.clone()
        kp[:, :, key] = float("nan")
        with torch.no_grad():
            out = fn(q, kp, v)
        nan_rows = torch.isnan(out).any(-1).any(0).any(0).nonzero().flatten().tolist()
        assert nan_rows == list(range(key, key + 5))


def test_visible_poison_follows_ieee():
    """A row that does see a non-finite value gets what IEEE arithmetic gives (masked_mm)."""
    a = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.5, 0.5, 0.0]])
    b = torch.tensor([[float("inf")], [float("-inf")], [float("nan")]])
    allowed = torch.tensor([[True, False, False], [False, True, False], [True, True, False]])
    got = masked_mm(a, b, allowed).flatten()
    assert got[0] == float("inf") and got[1] == float("-inf") and torch.isnan(got[2])
    zero_weight = masked_mm(torch.zeros(1, 1), torch.tensor([[float("inf")]]), torch.ones(1, 1, dtype=torch.bool))
    assert torch.isnan(zero_weight).all()  # 0 * inf on an allowed pair is NaN, as in a plain matmul


@pytest.mark.parametrize("src", [
    "causal & (block(8) | route(8, top = 2))",
    "route(8, top = 2, query_block = 4)",
    "pyramid(block = 8, query_block = 8, levels = [1, 2], keep = [0.5, 0.5], among = causal)",
])
def test_content_patterns_isolate_value_poison(src):
    """route/pyramid select from Q/K, so only V is poisoned here (a NaN key changes the
    selection itself: docs/reliability.md). Which rows may see a value is measured black-box:
    rows whose output moves when the poisoned entries take other finite values. Every other row
    must be finite and unchanged under NaN."""
    p = attnlang.compile(f"pattern p {{ tokens n[64]\n attend {src} }}").pattern
    planner = lambda pat, inputs: attnlang.make_plan(pat)  # noqa: E731
    q, k, v = tensors(64, B=2, H=4, Hkv=2)
    spots = [(key, "v", float("nan"), True) for key in (45, 46, 60)]
    _, vp, _, va = poisoned(q, k, v, spots, seed=1)
    _, _, _, vb = poisoned(q, k, v, spots, seed=2)
    for mod in (reference, torch_exec):
        (bad, lb, gb), (a, la, ga), (b, _, _) = (run(mod, p, q, k, x, planner) for x in (vp, va, vb))
        rows = (a == b).all(-1)  # [B, H, N]: rows that do not depend on the poisoned entries
        assert rows.float().mean() > 0.2, "the test needs rows that cannot see the poison"
        assert torch.isfinite(bad[rows]).all() and torch.isfinite(lb[rows]).all()
        torch.testing.assert_close(bad[rows], a[rows], **TOL)
        torch.testing.assert_close(lb[rows], la[rows], **TOL)
        torch.testing.assert_close(gb[0][rows], ga[0][rows], **TOL)  # dQ of those rows
