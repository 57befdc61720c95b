"""Code generation without torch or triton: predicates, loop bounds, tables, golden kernels.

The compiled predicate is executed here with a NumPy stand-in for ``tl`` whose integer ``//``
and ``%`` truncate toward zero like Triton's, and compared with ``Pattern.mask`` on every
(q, k) pair: a fast exhaustive check of the IR -> ``tl`` translation that the interpreter tests
then confirm on the real kernels.
"""
import ast
import base64
import dataclasses
import pathlib
import subprocess
import sys
import zlib

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang.codegen.module import (
    envelope_patterns, generate_module, module_plan,
)
from attnlang.codegen.predicate import compile_predicate
from attnlang.codegen.triton import CodegenError, generate_kernels, sympy_to_triton
from attnlang.errors import AttnError
from attnlang.pattern import (
    Pattern, block, causal, halo, keys, neighborhood, random, same, sliding, strided, valid,
)
from attnlang.plan import Plan, TileRange
from attnlang.planner import make_plan
from strategies import patterns

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "kernels"


# -- a NumPy stand-in for triton.language with C integer semantics ----------------------------

class CInt(np.ndarray):
    """int64 array whose // and % truncate toward zero, as Triton's integer ops do."""

    def __floordiv__(self, other):
        a, b = np.asarray(self), np.asarray(other)
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).view(CInt)

    def __mod__(self, other):
        a, b = np.asarray(self), np.asarray(other)
        return (a - b * np.asarray(self // other)).view(CInt)

    def __rfloordiv__(self, other):
        return np.asarray(other).view(CInt) // self

    def __rmod__(self, other):
        return np.asarray(other).view(CInt) % self


class _Ptr:
    def __init__(self, data, off=0):
        self.data, self.off = data, off

    def __add__(self, off):
        return _Ptr(self.data, self.off + off)


class FakeTL:
    minimum = staticmethod(lambda a, b: np.minimum(a, b).view(CInt) if np.ndim(np.minimum(a, b)) else min(a, b))
    maximum = staticmethod(lambda a, b: np.maximum(a, b).view(CInt) if np.ndim(np.maximum(a, b)) else max(a, b))
    where = staticmethod(np.where)

    @staticmethod
    def load(ptr, mask=None, other=0):
        idx = np.asarray(ptr.off)
        ok = np.ones(idx.shape, bool) if mask is None else np.broadcast_to(mask, idx.shape)
        safe = np.where(ok, idx, 0)
        return np.where(ok, ptr.data[safe], other).view(CInt)


def run_predicate(pattern, inputs=None, b=0):
    """Evaluate the compiled predicate of the pattern's first branch on all (q, k) pairs."""
    pred = compile_predicate(pattern.exprs()[0][2], pattern.layout, "g0")
    ns = {"tl": FakeTL, "triton": type("T", (), {"jit": staticmethod(lambda f: f)})}
    exec(pred.source(), ns)
    args = [_Ptr(t.data.astype(np.int64)) for t in pred.tables]
    for inp in pred.inputs:
        args.append(_Ptr(np.asarray(inputs[inp.name], dtype=np.int64).reshape(-1)))
    n = pattern.n
    q = np.concatenate([np.arange(n), [-1]])[:, None].view(CInt)
    k = np.concatenate([np.arange(n), [-1]])[None, :].view(CInt)
    out = np.broadcast_to(ns["_allowed_g0"](q, k, b, *args), (n + 1, n + 1))
    assert not out[n].any() and not out[:, n].any(), "padding must never be allowed"
    return np.asarray(out[:n, :n])


@settings(max_examples=150, deadline=None)
@given(patterns(max_rank=3, max_n=200, max_leaves=5))
def test_predicate_equals_mask(p):
    np.testing.assert_array_equal(run_predicate(p), p.mask()[0])


@pytest.mark.parametrize("expr, tokens", [
    (block(size=(3, 4), shift=(5, -3)), (9, 11)),  # shifts fold into [0, size): no negative //
    (halo(block=4, halo=2), (10, 9)),
    (neighborhood(window=(3, 5), dilation=(2, 2), stride=(2, 3), causal=(True, False)), (9, 12)),
    (keys(list(range(0, 90, 7))) | random(block=7, count=3, seed=5), 90),
    (strided(3) & ~causal, 40),
])
def test_predicate_examples(expr, tokens):
    p = Pattern.create(expr, tokens)
    np.testing.assert_array_equal(run_predicate(p), p.mask()[0])


def test_predicate_runtime_inputs():
    p = Pattern.create(causal & same("doc") | valid("len") & sliding(2), 30,
                       inputs={"doc": "ids", "len": "length"})
    doc = np.repeat([3, 1, 4], 10)
    for length in (0, 17, 30):
        got = run_predicate(p, {"doc": doc, "len": np.array([length])})
        np.testing.assert_array_equal(got, p.mask(inputs={"doc": doc, "len": length})[0])


# -- closed-form loop bounds -----------------------------------------------------------------

def _eval_bound(text: str, qt: int) -> int:
    def floordiv(a, b):  # the generated _floordiv (b > 0), with Triton's truncating //
        q = abs(a) // b * (1 if a >= 0 else -1)
        return q - 1 if a % b != 0 and a < 0 else q
    ns = {"tl": type("TL", (), {"minimum": staticmethod(min), "maximum": staticmethod(max),
                                "where": staticmethod(lambda c, a, b: a if c else b)}),
          "_floordiv": floordiv, "qt": qt}
    return eval(text, ns)


@pytest.mark.parametrize("expr, n, bm, bn", [
    (causal & sliding(20), 100, 16, 16),
    (causal, 200, 32, 16),
    (sliding(37), 300, 16, 64),
    (causal & sliding(5) | keys(range(0, 4)), 64, 16, 16),
])
def test_analytic_bounds_print_exactly(expr, n, bm, bn):
    plan = make_plan(Pattern.create(expr, n), block_m=bm, block_n=bn)
    g = plan.groups[0]
    if g.analytic is None:
        pytest.skip("the planner gave no closed form here")
    for field in ("lo", "hi", "full_lo", "full_hi"):
        e = sp.sympify(getattr(g.analytic, field))
        text = sympy_to_triton(e)
        for t in range(plan.q_tiles):
            want = int(e.subs({s: t for s in e.free_symbols}))
            assert _eval_bound(text, t) == want, (field, t, text)


def test_sympy_printer_rejects_what_it_cannot_express():
    with pytest.raises(CodegenError):
        sympy_to_triton(sp.Symbol("qt") / 3)
    with pytest.raises(CodegenError):
        sympy_to_triton(sp.Symbol("N") + 1)


# -- module text -----------------------------------------------------------------------------

def test_codegen_imports_neither_torch_nor_triton():
    code = ("import sys, attnlang.codegen.module as m, attnlang.commands.compile\n"
            "from attnlang.pattern import Pattern, causal\nfrom attnlang.plan import Plan\n"
            "p = Pattern.create(causal, tokens=32)\nm.generate_module(Plan.from_mask(p, p.mask(), 16, 16))\n"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _tables_of(source: str) -> dict:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_TABLES":
            return ast.literal_eval(node.value)
    raise AssertionError("no _TABLES")


def test_tables_roundtrip_inline_and_compressed(monkeypatch):
    import attnlang.codegen.module as m

    p = Pattern.create(causal & sliding(10) | random(block=16, count=2, seed=1), 256)
    plan = Plan.from_mask(p, p.mask(), 16, 16)
    kernels = generate_kernels(plan)
    for limit in (10_000, 0):  # all inline lists, then all zlib + base64
        monkeypatch.setattr(m, "INLINE_LIST_MAX", limit)
        tables = _tables_of(generate_module(plan).source)
        for t in kernels.tables:
            dtype, data = tables[t.name]
            if isinstance(data, str):
                data = np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.dtype(dtype).newbyteorder("<"))
            np.testing.assert_array_equal(np.asarray(data), t.data)


def test_bad_module_options():
    p = Pattern.create(causal, 32)
    plan = Plan.from_mask(p, p.mask(), 16, 16)
    with pytest.raises(AttnError, match="(?s)unknown target 'h1000'.*valid targets: h100, h200, b200, a100, cpu"):
        generate_module(plan, target="h1000")
    with pytest.raises(AttnError, match="head dim 512"):
        generate_module(plan, head_dim=512)
    with pytest.raises(AttnError, match="dtype 'fp64'"):
        generate_module(plan, dtype="fp64")


@given(st.lists(st.integers(0, 3), min_size=40, max_size=40), st.integers(0, 40))
@settings(max_examples=20, deadline=None)
def test_envelope_plan_covers_every_input(doc, length):
    p = Pattern.create((causal & same("doc") | ~valid("len")) & sliding(9), 40,
                       inputs={"doc": "ids", "len": "length"})
    plan = module_plan(p, lambda s: make_plan(s, block_m=16, block_n=16))
    assert len(envelope_patterns(p)) == 4
    exact = Plan.from_mask(p, p.mask(inputs={"doc": np.array(doc), "len": length}), 16, 16)
    env, real = plan.tile_map(), exact.tile_map()
    assert ((real > 0) <= (env > 0)).all(), "a tile with allowed pairs is not visited"
    assert ((env == 2) <= (real == 2)).all(), "a tile marked full is not full for these inputs"


# -- golden kernels --------------------------------------------------------------------------

def _oracle(p, block=16, order=None):
    return Plan.from_mask(p, p.mask(), block, block, order)


def _swa_analytic():
    # Hand-derived closed form of causal & sliding(40) at 32 x 32 tiles (no full tiles), so the
    # golden file does not move when the planner's simplifier does.
    qt = sp.Symbol("qt", integer=True, nonnegative=True)
    plan = _oracle(Pattern.create(causal & sliding(40), 256, name="swa"), 32)
    rng = TileRange(sp.Max(0, sp.floor((32 * qt - 40) / 32)), qt + 1, qt, qt)
    return dataclasses.replace(plan, groups=(dataclasses.replace(plan.groups[0], closed_form=rng),))


def _tiled_order(h, w, bh, bw):
    """Row-major boxes of bh x bw tokens, each box contiguous (no padding)."""
    idx = np.arange(h * w).reshape(h // bh, bh, w // bw, bw)
    return idx.transpose(0, 2, 1, 3).reshape(-1)


GOLDEN_CASES = {
    "swa_analytic": _swa_analytic,
    "na2d_tiled": lambda: _oracle(Pattern.create(neighborhood(window=(3, 3), dilation=(1, 2)), (8, 12), name="na2d"),
                                  order=_tiled_order(8, 12, 4, 4)),
    "packed_docs": lambda: module_plan(Pattern.create(causal & same("doc"), 64, name="packed_docs",
                                                      inputs={"doc": "ids"}), _oracle),
    "by_head": lambda: _oracle(Pattern.create({(0, 2): causal, (2, 4): block(16) | keys(range(0, 4))}, 48,
                                              heads=4, name="by_head")),
}


def test_swa_analytic_golden_range_equals_tables():
    plan = _swa_analytic()
    g, qt = plan.groups[0], sp.Symbol("qt", integer=True, nonnegative=True)
    for t in range(plan.q_tiles):
        lo, hi = (int(getattr(g.analytic, f).subs(qt, t)) for f in ("lo", "hi"))
        assert list(g.partial.row(t)) == list(range(lo, hi)) and len(g.full.row(t)) == 0


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_kernels(name, update_golden):
    source = generate_module(GOLDEN_CASES[name](), name=name, target="h100", version="golden").source
    path = GOLDEN / f"{name}.py"
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    assert path.exists(), f"missing {path}: run pytest --update-golden"
    assert source == path.read_text(), f"{path} differs from the generated source (pytest --update-golden)"
    compile(source, str(path), "exec")  # valid Python
    assert "make_block_ptr" not in source
