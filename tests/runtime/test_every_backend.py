"""Classes of inputs that once gave silent wrong results on some backend (issue 11, items 1, 2, 5).

Every case runs on every backend (reference, torch, flex, and the generated Triton kernels under
the CPU interpreter) and must either equal the dense reference or be refused with an AttnError:
* ``by head`` branches written in any order, with any ranges;
* document ids that differ only in high bits, per batch item, at the int64 extremes;
* integer parameters at and past the axis length, 2**31, 2**62, 2**63 and 10**30.
Shapes stay tiny: the Triton interpreter needs milliseconds per tile.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings, strategies as st  # noqa: E402

import attnlang  # noqa: E402
from attnlang.errors import AttnError  # noqa: E402
from attnlang.pattern import Pattern, causal, same  # noqa: E402
from strategies import by_head_patterns, extreme_primitives, extreme_ints  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BACKENDS = ("torch", "flex", "triton")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def _tensors(B, H, N, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(4)]


def assert_every_backend_matches(spec, N, B=1, H=2, inputs=None, grads=False, seed=0, backends=BACKENDS, **kw):
    """Run ``spec`` (``N`` tokens) on every backend; each must equal the reference (out, lse;
    grads on the backends that have a CPU backward)."""
    q, k, v, do = _tensors(B, H, N, seed=seed)

    def run(backend, with_grads):
        fn = attnlang.compile(spec, backend=backend, **kw)
        qq, kk, vv = (t.clone().requires_grad_(with_grads) for t in (q, k, v))
        out, lse = fn(qq, kk, vv, return_lse=True, **(inputs or {}))
        res = [out.detach(), lse.detach()]
        if with_grads:
            res += list(torch.autograd.grad(out, (qq, kk, vv), do))
        return res

    ref = run("reference", grads)
    for backend in backends:
        with_grads = grads and backend != "flex"  # flex has no CPU backward
        got = run(backend, with_grads)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            if name == "lse":
                assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{backend}: lse -inf rows differ"
                a, b = a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{backend} {name}: {m}")


# --- 1. by head: branch order ----------------------------------------------------------------

def test_by_head_branches_out_of_head_order_issue_example():
    src = """pattern p {
    tokens n[8]
    heads 4
    attend by head {
        2..4: full
        0..2: causal
    }
}"""
    assert_every_backend_matches(src, 8, H=4, grads=True)


def test_by_head_branches_are_stored_in_head_order():
    p = Pattern.create({(2, 4): attnlang.full, (0, 2): causal}, 8, heads=4)
    assert [(b.lo, b.hi) for b in p.attend.branches] == [(0, 2), (2, 4)]
    assert attnlang.parse(p.to_attn()).instantiate() == p


def test_triton_head_switch_follows_head_order_even_for_unsorted_groups():
    # A Pattern built without Pattern.create keeps its branch order: the switch must still test
    # the ranges in ascending order.
    from attnlang.codegen.triton import generate_kernels
    from attnlang.pattern import ByHead, HeadRange, Layout
    from attnlang.planner import make_plan

    p = Pattern(Layout.of(8), ByHead((HeadRange(2, 4, attnlang.full), HeadRange(0, 2, causal))), heads=4)
    src = generate_kernels(make_plan(p, block_m=16, block_n=16)).source
    first = src.index("if h < ")
    assert src.startswith("if h < 2:", first), src[first:first + 40]


@given(by_head_patterns(max_n=24, max_heads=4), st.booleans())
@settings(max_examples=6)
def test_by_head_any_order_any_ranges_every_backend(ph, via_text):
    p, text = ph
    assert_every_backend_matches(text if via_text else p, p.n, H=p.heads, grads=True)


# --- 2. document ids at full int64 width --------------------------------------------------------

_EDGE_IDS = [0, 1, -1, -2, 2**31 - 1, 2**31, -(2**31), 2**32, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)]
_DOC = "pattern p {{ tokens n[{n}]\n input doc: ids[{n}]\n attend {e} }}"


def test_ids_differing_only_above_bit_31_are_distinct_documents():
    ids = torch.tensor([0] * 8 + [2**32] * 8)
    assert_every_backend_matches(_DOC.format(n=16, e="same(doc)"), 16, inputs={"doc": ids})
    ids = torch.tensor([[2**31] * 5 + [-(2**31)] * 11, [-(2**63)] * 9 + [2**63 - 1] * 7])
    assert_every_backend_matches(_DOC.format(n=16, e="causal & same(doc)"), 16, B=2, inputs={"doc": ids})


@st.composite
def _id_rows(draw, n):
    """One row of ``n`` int64 ids from few distinct values, some equal below bit 32 only."""
    base = draw(st.lists(st.one_of(st.sampled_from(_EDGE_IDS), st.integers(-(2**63), 2**63 - 1)),
                         min_size=1, max_size=3))
    hi = [(b & 0xFFFFFFFF) + (draw(st.integers(-(2**31), 2**31 - 1)) << 32) for b in base]  # same low bits
    vals = base + hi
    return [draw(st.sampled_from(vals)) for _ in range(n)]


@given(st.integers(5, 20).flatmap(lambda n: st.tuples(st.just(n), st.lists(_id_rows(n), min_size=1, max_size=2))),
       st.sampled_from(["same(doc)", "causal & same(doc)", "same(doc) | sliding(1)"]))
@settings(max_examples=12)
def test_int64_ids_per_batch_item_every_backend(n_rows, expr):
    n, rows = n_rows
    ids = torch.tensor(rows, dtype=torch.int64)
    assert_every_backend_matches(_DOC.format(n=n, e=expr), n, B=len(rows), inputs={"doc": ids})


def test_ids_wider_than_int64_are_refused_with_a_clear_error():
    fn = attnlang.compile(_DOC.format(n=4, e="same(doc)"), backend="torch")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(AttnError, match="doc.*int64"):
        fn(q, q, q, doc=[0, 2**64, -1, 3])


def test_standalone_module_keeps_ids_at_full_width():
    # The vendored module (attnlang compile) must not narrow ids either.
    from attnlang.runtime import triton as tb
    from attnlang.planner import make_plan

    p = attnlang.compile(_DOC.format(n=16, e="same(doc)"), backend="reference")
    pat = attnlang.resolve(_DOC.format(n=16, e="same(doc)"))
    mod = tb.per_call_module(make_plan(pat, inputs={"doc": np.zeros(16, np.int64)}), "cpu")[0]
    q, k, v, _ = _tensors(1, 1, 16)
    ids = torch.tensor([0] * 8 + [2**32] * 8)
    assert mod._check(q, k, v, {"doc": ids})["IN_doc"].dtype == torch.int64
    torch.testing.assert_close(attnlang.compile(pat, backend="triton")(q, k, v, doc=ids), p(q, k, v, doc=ids),
                               atol=1e-5, rtol=1e-5)


# --- 5. integer parameters at and past the machine widths ------------------------------------------

def test_issue_examples_of_huge_windows():
    n = 16
    # In .attn text, literals past 2**62 are refused where they are written (the checker's integer
    # bound); below it, a window wider than the axis means `inf` on every backend.
    for e in (f"window(before = 0, after = {2**62})", f"causal & sliding({2**62 - 1})",
              f"causal & sliding({2**31})", f"sliding({2**31 - 1})"):
        assert_every_backend_matches(f"pattern p {{ tokens n[{n}]\n attend {e} }}", n)
    for e in (f"window(before = 0, after = {2**63 - 1})", f"causal & sliding({2**63})",
              f"window(before = {10**30})"):
        with pytest.raises(AttnError) as err:
            attnlang.compile(f"pattern p {{ tokens n[{n}]\n attend {e} }}", backend="reference")
        assert "<string>:2:" in str(err.value) and "2**62" in str(err.value)
    # Python builders bypass the checker: they are clamped at bind, never wrapped.
    assert_every_backend_matches(causal & attnlang.sliding(2**63), n, tokens=n)
    assert_every_backend_matches(attnlang.window(before=0, after=2**63 - 1), n, tokens=n)
    assert_every_backend_matches(attnlang.window(before=10**30), n, tokens=n)


def test_binding_stores_canonical_values():
    from attnlang.pattern import INF, Block, Halo, Window

    p = Pattern.create(attnlang.sliding(2**63) & attnlang.window(16, 15), 16)
    assert [n for n in p.attend.walk() if isinstance(n, Window)] == [Window(INF, INF), Window(INF, 15)]
    p = Pattern.create(attnlang.block(4, 2**63 + 1) & attnlang.halo(2, 10**30), 16)
    assert next(n for n in p.attend.walk() if isinstance(n, Block)).shift == ((2**63 + 1) % 4,)
    assert next(n for n in p.attend.walk() if isinstance(n, Halo)).halo == (16,)
    r = Pattern.create(attnlang.route(4, top=2**63), 16).attend
    assert r.top == 4  # every one of the 4 key blocks


def test_random_seed_past_32_bits_is_refused_where_it_is_written():
    with pytest.raises(AttnError) as e:
        attnlang.compile(f"pattern p {{ tokens n[16]\n attend random(block = 4, count = 1, seed = {2**32}) }}")
    assert "<string>:2:" in str(e.value) and "seed" in str(e.value)


def _run_or_located(spec, n, text: bool, **kw):
    try:
        attnlang.compile(spec, backend="reference", **kw)
    except AttnError as e:
        if text:  # .attn errors point at the source
            assert "<string>:" in str(e), str(e)
        return
    assert_every_backend_matches(spec, n, **kw)


@given(st.integers(4, 20).flatmap(lambda n: st.tuples(st.just(n), extreme_primitives(n))),
       st.sampled_from(["{}", "causal & {}", "~{}"]), st.booleans())
@settings(max_examples=60)
@example((16, (lambda: attnlang.sliding(2**63), f"sliding({2**63})")), "causal & {}", False)
@example((16, (lambda: attnlang.window(0, 2**63 - 1), f"window(before = 0, after = {2**63 - 1})")), "{}", True)
@example((16, (lambda: attnlang.block(4, 2**62), f"block(size = 4, shift = {2**62})")), "{}", True)
@example((9, (lambda: attnlang.halo(2, 2**31), f"halo(block = 2, halo = {2**31})")), "~{}", False)
def test_extreme_integer_parameters_equal_reference_or_located_error(n_prim, ctx, text):
    """Huge, negative and boundary integers: the reference's answer on every backend, or an
    AttnError (located for .attn text); never another exception, never a wrong value."""
    n, (build, src) = n_prim
    if text:
        _run_or_located(f"pattern p {{ tokens n[{n}]\n attend {ctx.format(src)} }}", n, True)
        return
    try:
        expr = build()
    except AttnError:  # a builder refusing a value (negative size) at construction is fine
        return
    e = {"{}": expr, "causal & {}": causal & expr, "~{}": ~expr}[ctx]
    _run_or_located(e, n, False, tokens=n)


def test_triton_refuses_sizes_past_its_int32_offsets():
    """Token x head-dim offsets are int32 in the kernels: a call that would wrap them is refused
    (expanded tensors: no memory is allocated)."""
    from attnlang.runtime import triton as tb
    from attnlang.runtime.call import Call

    for n, d in ((2**24, 128), (2**30, 2)):
        p = Pattern.create(causal, n)
        q = torch.empty(1, 1, 1, d).expand(1, 1, n, d)
        why = tb.supports(Call(p, q, q, q, 1.0, {}, None))
        assert why is not None and "int32" in why and "backend='torch'" in why
    q = torch.empty(1, 1, 1, 128).expand(1, 1, 2**24 - 512, 128)
    assert tb.supports(Call(Pattern.create(causal, 2**24 - 512), q, q, q, 1.0, {}, None)) is None


@pytest.mark.parametrize("expr", [f"route(block = 4, top = {2**62})",  # the language's largest integer
                                  f"causal & route(block = 4, top = {2**62}, scope = head)",
                                  f"route(block = 4, top = {2**62}, permute_keys = importance(segment = {2**62}))"])
def test_routed_counts_past_the_layout(expr):
    """`top` and the PBS segment used to overflow in the routing stage (even the reference)."""
    assert_every_backend_matches(f"pattern p {{ tokens n[32]\n attend {expr} }}", 32,
                                 backends=("torch", "triton"))


def test_cli_plans_huge_parameters_and_compiles_by_head_in_head_order(tmp_path, capsys):
    """`window(before = 10**30)` once made the CLI print "internal error" (now a located error:
    the language's integers stop at 2**62; the largest one plans as a window of `inf`);
    `attnlang compile` wrote the out-of-order head switch of item 1."""
    from attnlang.cli import main

    f = tmp_path / "p.attn"
    big = tmp_path / "big.attn"
    big.write_text(f"pattern w {{\n    tokens n[64]\n    attend causal & window(before = {10**30})\n}}\n")
    assert main(["check", str(big)]) == 1
    err = capsys.readouterr().err
    assert "big.attn:3:" in err and "2**62" in err and "internal error" not in err
    f.write_text(f"pattern w {{\n    tokens n[64]\n    attend causal & window(before = {2**62}) "
                 f"| block(size = 8, shift = {-(2**62)})\n}}\n"
                 "pattern h {\n    tokens n[8]\n    heads 4\n    attend by head {\n"
                 "        2..4: full\n        0..2: causal\n    }\n}\n")
    for cmd in (["check"], ["plan", "-p", "w"], ["simulate", "-p", "w"]):
        assert main([*cmd, str(f)]) == 0, capsys.readouterr()
    assert main(["compile", str(f), "-p", "h", "-o", str(tmp_path / "out")]) == 0
    src = (tmp_path / "out" / "h.py").read_text()
    assert src.index("if h < 2:  # heads 0..2") < src.index("else:  # heads 2..4")
