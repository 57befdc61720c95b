"""Every consumer of the Pattern IR keeps one table keyed by node type; this file checks each table
against the primitive list (attnlang.ir.nodes.NODES) and names what each one leaves out on
purpose. A node type without a row (or a named omission) in some table fails here, not with a
NotImplementedError at a user's call.

The last test adds a toy primitive by the recipe in docs/_arch_tables.md and runs it end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import attnlang
from attnlang import closed_form, tiling
from attnlang.codegen import predicate as triton_predicate
from attnlang.errors import Span
from attnlang.grammar import load, prims
from attnlang.ir.nodes import COMBINATORS, NODES, PRIMITIVES
from attnlang.pattern import (
    And, Axial, Block, Causal, Empty, Expr, Full, Grid, Halo, Keys, Neighborhood, Not, Or, Pattern,
    Queries, Random, Route, Same, Strided, Valid, Window, axial, block, causal, full, grid, halo, keys,
    neighborhood, none, queries, random, route, same, sliding, strided, valid,
)
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.runtime import flex

TOKENS = (8, 16)
INPUTS = {"doc": "ids", "len": "length"}
IDS = np.repeat(np.arange(8), 16)[np.random.default_rng(0).permutation(128)]
RUNTIME = {"doc": IDS, "len": np.int64(100)}

# One or more expressions per node type, on an 8 x 16 grid (flat causal and causal on an axis).
SAMPLES: dict[type, list[Expr]] = {
    Full: [full], Empty: [none], Causal: [causal, causal("h")], Window: [sliding(3)],
    Neighborhood: [neighborhood((3, 3), dilation=(1, 2))], Block: [block((2, 4), shift=(0, 1))],
    Strided: [strided((2, 3))], Grid: [grid(2)], Axial: [axial("w")], Halo: [halo(2, 1)],
    Keys: [keys(0, 5)], Queries: [queries([1, 9, 30])], Random: [random(4, 2, seed=3)],
    Same: [same("doc")], Valid: [valid("len")], Route: [route(4, top=2)],
    And: [causal & block(2)], Or: [causal("w") | keys(0, 2)], Not: [~sliding(2)],
}


def node_methods(nodes) -> dict[type, str]:
    """The node class is the table of its meaning and text: ``allowed`` and ``to_attn``."""
    return {t: "allowed, to_attn" for t in nodes if "allowed" in vars(t) and "to_attn" in vars(t)}


def tables(nodes=NODES) -> dict[str, tuple[dict, dict]]:
    """name -> (table keyed by node type, node types it leaves out -> why)."""
    names = {t: t.keyword for t in nodes if hasattr(t, "keyword")}
    return {
        "tile rules (attnlang.tiling.FACTOR)": (tiling.FACTOR, tiling.FACTOR_LEAVES_OUT),
        "closed forms (attnlang.closed_form.CONSTRAIN)": (closed_form.CONSTRAIN, closed_form.CONSTRAIN_LEAVES_OUT),
        "Triton predicate (attnlang.codegen.predicate.TRITON)": (triton_predicate.TRITON,
                                                                 triton_predicate.TRITON_LEAVES_OUT),
        "flex mask_mod (attnlang.runtime.flex.MASK_MOD)": (flex.MASK_MOD, flex.MASK_MOD_LEAVES_OUT),
        "grammar (attnlang.grammar.prims.PRIMITIVES)": (
            {t: prims.PRIMITIVES[kw] for t, kw in names.items() if kw in prims.PRIMITIVES},
            {t: "an operator (& | - ~), not a name" for t in COMBINATORS}),
        "Python builders (attnlang.pattern)": (
            {t: getattr(attnlang.pattern, kw) for t, kw in names.items() if hasattr(attnlang.pattern, kw)},
            {t: "an operator (& | - ~) on expressions" for t in COMBINATORS}),
        "node methods (allowed, to_attn)": (node_methods(nodes), {}),
    }


# What each table leaves out on purpose. Changing an omission is a decision: edit it here too.
LEAVES_OUT = {
    "tile rules (attnlang.tiling.FACTOR)": {
        Full, Empty, Window, Keys, Queries, Random, Same, Valid, Route, And, Or, Not},
    "closed forms (attnlang.closed_form.CONSTRAIN)": {
        Empty, And, Or, Not, Halo, Keys, Queries, Random, Same, Valid, Route},
    "Triton predicate (attnlang.codegen.predicate.TRITON)": set(),
    "flex mask_mod (attnlang.runtime.flex.MASK_MOD)": {Route},
    "grammar (attnlang.grammar.prims.PRIMITIVES)": {And, Or, Not},
    "Python builders (attnlang.pattern)": {And, Or, Not},
    "node methods (allowed, to_attn)": set(),
}


def missing_rows(nodes) -> dict[str, set[type]]:
    """Per table, the node types with neither a row nor a named omission."""
    out = {}
    for name, (table, omitted) in tables(nodes).items():
        gap = set(nodes) - set(table) - set(omitted)
        if gap:
            out[name] = gap
    return out


def test_primitive_list_is_the_node_list():
    assert set(PRIMITIVES) | set(COMBINATORS) == set(NODES)
    assert len(set(t.keyword for t in PRIMITIVES)) == len(PRIMITIVES)
    assert set(SAMPLES) == set(NODES), "add a sample of the new node type to SAMPLES"


def test_every_table_covers_every_node():
    assert missing_rows(NODES) == {}


@pytest.mark.parametrize("name", list(LEAVES_OUT))
def test_each_table_names_what_it_leaves_out(name):
    table, omitted = tables()[name]
    assert set(omitted) == LEAVES_OUT[name]
    assert not set(table) & set(omitted), "a node type is both handled and left out"
    assert set(table) <= set(NODES), "a row for a node type that is not in attnlang.ir.nodes.NODES"
    assert all(isinstance(why, str) and why for why in omitted.values())


def _pattern(e: Expr) -> Pattern:
    return Pattern.create(e, tokens=TOKENS, inputs=INPUTS)


def _samples(table):
    return [(t, e) for t in table for e in SAMPLES[t]]


def test_tile_rules_factor_their_samples():
    for t, e in _samples(tiling.FACTOR):
        p = _pattern(e)
        f = tiling.factor(p.attend, p.layout)
        assert f is not None or (t is Causal and e.axis is None), e


def test_closed_forms_count_their_samples():
    for t, e in _samples(closed_form.CONSTRAIN):
        p = _pattern(e)
        cf = closed_form.derive(p)
        assert cf is not None, e
        assert cf.count() == p.mask(inputs=RUNTIME).sum(), e


def test_triton_predicate_compiles_every_sample():
    for t, e in _samples(triton_predicate.TRITON):
        p = _pattern(e)
        pred = triton_predicate.compile_predicate(p.attend, p.layout, "g0")
        assert pred.expr and "@triton.jit" in pred.source(), e


def _flex_mask(p: Pattern) -> np.ndarray:
    inputs = {"doc": torch.as_tensor(IDS)[None], "len": torch.tensor([100])}
    fn = flex.predicate(p.attend, p.layout, inputs, "cpu")
    idx = torch.arange(p.n)
    return fn(torch.zeros((), dtype=torch.int64), idx[:, None], idx[None, :]).expand(p.n, p.n).numpy()


def test_flex_mask_mod_equals_allowed_on_every_sample():
    for t, e in _samples(flex.MASK_MOD):
        p = _pattern(e)
        assert np.array_equal(_flex_mask(p), p.mask(inputs=RUNTIME)[0]), e


def _plan_matches_oracle(p: Pattern) -> None:
    plan = make_plan(p, inputs=RUNTIME if p.inputs else None, block_m=16, block_n=16)
    ref = Plan.from_mask(p, p.mask(inputs=RUNTIME), plan.block_m, plan.block_n, plan.order)
    for g, r in zip(plan.groups, ref.groups):
        for mine, theirs in ((g.partial, r.partial), (g.full, r.full)):
            assert np.array_equal(mine.indptr, theirs.indptr), p.to_attn()
            assert np.array_equal(mine.indices, theirs.indices), p.to_attn()


def test_every_static_node_plans_exactly():
    # Route is planned per call from Q/K (tests/content/test_routing_stage.py, tests/content/test_route_family.py).
    for t, e in _samples([t for t in NODES if t is not Route]):
        _plan_matches_oracle(_pattern(e))


def test_printer_round_trips_every_sample():
    for t, e in _samples(NODES):
        p = _pattern(e)
        assert load(p.to_attn()).instantiate() == p, e


# --------------------------------------------------------------------------------------------
# The recipe, followed once: a toy primitive `diagonal` (each token sees itself only)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diagonal(Expr):
    """``k == q``: each token sees only itself."""

    keyword = "diagonal"  # the name in the language

    span: Span | None = field(default=None, compare=False, repr=False)

    def allowed(self, q, k, env):
        return k.flat == q.flat

    def to_attn(self):
        return "diagonal"


def _diagonal_factor(node, layout, out):
    for a, L in enumerate(layout.sizes):  # equal on every axis
        out[a].append(tiling.AxisPred(tiling.AxisKind.EQ, L, None))
    return True


def _diagonal_constrain(it, layout, axes, names):
    for ax in axes:
        closed_form._window(ax, 0, 0)


def test_toy_primitive_by_the_recipe(monkeypatch):
    nodes = NODES + (Diagonal,)
    # 1. the node class alone (allowed, to_attn, keyword): every other table reports its gap.
    assert set(missing_rows(nodes)) == set(LEAVES_OUT) - {"node methods (allowed, to_attn)"}
    # 2. one row per table (grammar entry, Python builder, tile rule, closed form, Triton, flex).
    monkeypatch.setitem(prims.PRIMITIVES, "diagonal", prims.Primitive("diagonal", (), lambda span: Diagonal(span)))
    monkeypatch.setattr(attnlang.pattern, "diagonal", Diagonal(), raising=False)
    monkeypatch.setitem(tiling.FACTOR, Diagonal, _diagonal_factor)
    monkeypatch.setitem(closed_form.CONSTRAIN, Diagonal, _diagonal_constrain)
    monkeypatch.setitem(triton_predicate.TRITON, Diagonal, lambda c, e: "(k == q)")
    monkeypatch.setitem(flex.MASK_MOD, Diagonal, lambda e, c: lambda b, q, k: k == q)
    assert missing_rows(nodes) == {}
    # 3. it works end to end: text, meaning, plan, closed form, Triton text, flex mask.
    src = "pattern toy {\n    tokens h[8], w[16]\n    attend diagonal | keys(0..2)\n}\n"
    p = load(src).instantiate()
    assert p.attend == Diagonal() | keys(0, 2)
    assert load(p.to_attn()).instantiate() == p
    want = np.eye(128, dtype=bool)
    want[:, :2] = True
    assert np.array_equal(p.mask()[0], want)
    _plan_matches_oracle(p)
    alone = Pattern.create(Diagonal(), tokens=TOKENS)
    assert closed_form.derive(alone).count() == 128
    assert "(k == q)" in triton_predicate.compile_predicate(p.attend, p.layout, "g0").expr
    assert np.array_equal(_flex_mask(p), want)
    q, k, v = (torch.randn(1, 1, 128, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = attnlang.compile(p, backend="torch")(q, k, v)
    ref = attnlang.compile(p, backend="reference")(q, k, v)
    torch.testing.assert_close(out, ref)
