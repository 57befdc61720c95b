"""Checker: .attn text -> Pattern IR equals the Python-built pattern; the Module API."""
import math

import numpy as np
import pytest

from attnlang import (
    Pattern, axial, block, causal, full, global_, grid, halo, keys, neighborhood, none, queries,
    random, same, sink, sliding, strided, valid, window,
)
from attnlang.errors import AttnError
from attnlang.grammar import load, parse_value
from attnlang.pattern import INF, Window


def attend(expr_text: str, tokens: str = "n[16]", lets: str = "") -> Pattern:
    return load(f"{lets}pattern p {{\n    tokens {tokens}\n    attend {expr_text}\n}}\n").instantiate()


L1, L2, L3 = 16, (8, 8), (2, 4, 4)
TABLE = [
    ("full", L1, full), ("none", L1, none), ("causal", L1, causal), ("causal(w)", L2, causal("w")),
    ("window(before = 3)", L1, window(before=3)),
    ("window(2, 5)", L1, window(2, 5)),
    ("window(before = inf, after = 1)", L1, window(INF, 1)),
    ("sliding(3)", L1, sliding(3)),
    ("neighborhood(window = (3, 5), dilation = (1, 1), stride = 1, causal = (true, false))", L2,
     neighborhood((3, 5), 1, 1, (True, False))),
    ("neighborhood(2)", L3, neighborhood(2)),
    ("block(4)", L2, block(4)), ("block(size = (2, 4), shift = 2)", L2, block((2, 4), 2)),
    ("strided(2)", L2, strided(2)), ("grid((2, 4))", L2, grid((2, 4))),
    ("axial(h)", L3, axial("h")), ("halo(block = 4, halo = 1)", L2, halo(4, 1)),
    ("keys(0..4)", L1, keys(0, 4)), ("keys([3, 1, 3])", L1, keys([1, 3])),
    ("queries(2..5)", L1, queries(2, 5)), ("global(0..2)", L1, global_(0, 2)), ("sink(4)", L1, sink(4)),
    ("random(block = 4, count = 2, seed = 7)", L1, random(4, 2, 7)),
    ("random(4, 2)", L1, random(4, 2, 0)),
    ("causal & sliding(2)", L1, causal & sliding(2)),
    ("causal - sliding(2)", L1, causal - sliding(2)),
    ("~causal | sink(1)", L1, ~causal | sink(1)),
    ("causal & (sliding(2) | sink(1))", L1, causal & (sliding(2) | sink(1))),
    ("full & causal", L1, causal), ("~~causal", L1, causal), ("~none", L1, full),
]


def _tokens(layout):
    if isinstance(layout, int):
        return f"n[{layout}]", layout
    names = ("h", "w") if len(layout) == 2 else ("t", "h", "w")
    return ", ".join(f"{a}[{s}]" for a, s in zip(names, layout)), dict(zip(names, layout))


@pytest.mark.parametrize("text, layout, built", TABLE, ids=[t for t, _, _ in TABLE])
def test_primitives_equal_python_builders(text, layout, built):
    tokens, py = _tokens(layout)
    p = attend(text, tokens)
    assert p == Pattern.create(built, py, name="p")
    assert np.array_equal(p.mask(), Pattern.create(built, py).mask())


def test_values_and_arithmetic():
    lets = ("let S = (2, 4)\nlet T = [(1, 8), (2, 4)]\nlet M = min(3, 2 * 4 - 7, 9 // 2 % 3)\n"
            "let Z = max(S)\n")
    p = attend("block(size = T[1], shift = S // 2) & sliding(M) & grid(Z)", "h[8], w[8]", lets)
    assert p.attend == (block((2, 4), (1, 2)) & sliding(1) & grid(4)).bind(p.layout, [])
    m = load(lets + "pattern q { tokens n[4]\n attend full }\n")
    assert m.constants == {"S": (2, 4), "T": [(1, 8), (2, 4)], "M": 1, "Z": 4}


def test_constants_are_lazy_and_in_any_order():
    m = load("pattern p { tokens n[A]\n attend sliding(B) }\nlet A = B * 4\nlet B = 2\n")
    assert m.instantiate().n == 8


def test_macros_defaults_shadowing_and_axis_arguments():
    src = """
def local(r = 2, c = causal) = c & sliding(r)
def along(ax) = axial(ax) & causal(ax)
def swa(r) = sliding(r)                       # shadows the prelude's swa
pattern p(T = 2, H = 4) {
    tokens t[T], h[H]
    let R = H - 1
    attend local(R) | local(c = full) | along(h) | swa(1)
}
"""
    p = load(src).instantiate()
    want = (causal & sliding(3)) | sliding(2) | (axial("h") & causal("h")) | sliding(1)
    assert p.attend == want.bind(p.layout, [])


def test_prelude_names_visible_and_bare_zero_arg_macro():
    p = load("pattern p {\n tokens n[32]\n attend swa\n}\n").instantiate()
    # binding stores a window wider than the 32 tokens as inf (docs/language.md, integer limits)
    assert p.attend == Pattern.create(causal & sliding(4096), 32).attend == causal & sliding(INF)


def test_params_defaults_overrides_and_resolved_values():
    m = load("let W = 4\npattern p(N = 32, r = W, k = (1, 2), on = true) {\n tokens n[N]\n attend sliding(r)\n}\n")
    p = m.instantiate()
    assert (p.name, p.n, p.params) == ("p", 32, (("N", 32), ("r", 4), ("k", (1, 2)), ("on", True)))
    p = m.instantiate("p", {"N": np.int64(64), "r": 8})
    assert p.n == 64 and p.attend == Window(8, 8)
    with pytest.raises(AttnError, match="no parameter 'rr'; did you mean 'r'"):
        m.instantiate(params={"rr": 3})
    with pytest.raises(AttnError, match="not an attnlang value"):
        m.instantiate(params={"r": object()})


def test_length_binding_and_needs_length():
    m = load("pattern a(N) {\n tokens n[N]\n attend causal\n}\n"
             "pattern b(T, H = 4) {\n tokens t[T], h[H]\n attend causal\n}\n"
             "pattern c(N = 8) {\n tokens n[N]\n attend causal\n}\n")
    assert m.needs_length("a") and not m.needs_length("a", {"N": 4})
    assert not m.needs_length("b") and not m.needs_length("c")
    assert m.instantiate("a", n=12).n == 12
    assert m.instantiate("a", n=12).params == (("N", 12),)
    assert m.instantiate("c", n=12).n == 8  # n only binds a length that has no value
    with pytest.raises(AttnError, match="needs a value for parameter 'T'"):
        m.instantiate("b", n=12)


def test_pattern_selection():
    m = load("pattern a {\n tokens n[4]\n attend full\n}\npattern b {\n tokens n[4]\n attend none\n}\n")
    assert m.names == ["a", "b"]
    with pytest.raises(AttnError, match="choose one with pattern=NAME") as e:
        m.instantiate()
    assert "a, b" in str(e.value)
    with pytest.raises(AttnError, match="did you mean 'a'"):
        m.instantiate("aa")


def test_heads_inputs_by_head_and_schedule():
    src = """pattern p(N = 16) {
    tokens n[N]
    heads 4
    input doc: ids[N]
    input len: length
    attend by head {
        0..1: causal & same(doc)
        1..4: valid(len)
    }
    schedule tile(q = 32, kv = 16)
    schedule order(natural)
}
"""
    p = load(src).instantiate()
    assert p.heads == 4 and [(i.name, i.kind) for i in p.inputs] == [("doc", "ids"), ("len", "length")]
    assert (p.schedule.tile_q, p.schedule.tile_kv, p.schedule.order) == ((32,), (16,), "natural")
    built = Pattern.create({(0, 1): causal & same("doc"), (1, 4): valid("len")}, 16, name="p", heads=4,
                           inputs={"doc": "ids", "len": "length"}, tile_q=32, tile_kv=16, order="natural",
                           params={"N": 16})
    assert p == built
    doc = np.repeat([0, 1], 8)
    m = p.mask(inputs={"doc": doc, "len": 10})
    assert np.array_equal(m[0], np.tril(doc[:, None] == doc[None, :]))


def test_spans_reach_the_ir():
    p = load("pattern p {\n tokens n[8]\n attend causal & sliding(2)\n}\n", "s.attn").instantiate()
    s = p.attend.items[1].span
    assert (s.source.name, s.line, s.col) == ("s.attn", 3, 18)


def test_float_values_parse_but_no_static_primitive_takes_one():
    assert parse_value("0.5") == 0.5 and parse_value("inf") == math.inf
    assert parse_value("0..4") == range(0, 4)
    with pytest.raises(AttnError, match="must be an integer or a tuple of integers"):
        attend("block(0.5)")


def test_check_passes_on_a_good_file():
    load("def f(x) = sliding(x)\npattern p(N) {\n tokens n[N]\n attend f(2)\n}\n").check()
