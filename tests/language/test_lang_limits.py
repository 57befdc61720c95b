"""Limits of the language (grammar/limits.py, docs/language.md §11.1), as properties over the
class of inputs: nesting depth, flat chains, evaluation depth, integer size, long literals; and
the issue-11 regressions of the parser and checker (each failed before: RecursionError, ValueError,
minutes of big-integer arithmetic, seconds of hint building)."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang.errors import AttnError
from attnlang.grammar import load
from attnlang.grammar.limits import MAX_EVAL_DEPTH, MAX_INT, MAX_NESTING
from attnlang.pattern import And, Or


def check(text: str) -> AttnError | None:
    """None if ``check`` passes, else its AttnError (any other exception fails the test)."""
    try:
        load(text, "f.attn", strict=False).check()
    except AttnError as e:
        return e
    return None


def pattern(attend: str) -> str:
    return f"pattern p {{\n    tokens n[16]\n    attend {attend}\n}}\n"


# Each construct nests one level per repetition: (prefix, suffix, innermost), as a pattern or a value.
NESTED = {
    "complement": ("~", "", "causal", True),
    "negation": ("-", "", "1", False),
    "min call": ("min(", ", 1)", "1", False),
    "tuple": ("(", ", 1)", "1", False),
    "list": ("[", "]", "1", False),
    "index": ("[0][", "]", "0", False),
    "right operand": ("causal & (", ")", "causal", True),
}


def nested(kind: str, depth: int) -> str:
    pre, post, inner, is_pattern = NESTED[kind]
    e = pre * depth + inner + post * depth
    return pattern(e) if is_pattern else f"let v = {e}\n"


@settings(max_examples=60)
@given(st.sampled_from(sorted(NESTED)), st.integers(0, 3 * MAX_NESTING))
def test_nesting_up_to_the_limit_passes_and_beyond_is_a_located_error(kind, depth):
    err = check(nested(kind, depth))
    # `attend` itself is not a level; a pattern's expression starts at level 0
    if depth <= MAX_NESTING - 1:
        assert err is None, err
    elif depth > MAX_NESTING:
        assert err is not None and "nested too deeply" in str(err), err
        d = err.diagnostics[0]
        assert d.span is not None and d.span.line >= 1


@pytest.mark.parametrize("kind, depth", [("complement", 489), ("min call", 163), ("tuple", 490)])
def test_issue_depths_that_raised_recursion_error(kind, depth):
    err = check(nested(kind, depth))
    assert err is not None and "nested too deeply" in err.diagnostics[0].message
    assert str(err).startswith("f.attn:")


def test_parentheses_alone_are_free():
    assert check(f"let v = {'(' * 5000}1{')' * 5000}\n") is None


@settings(max_examples=12)
@given(st.sampled_from(["&", "|", "-"]), st.integers(1, 5000))
def test_flat_pattern_chains_of_any_length(op, n):
    text = pattern(f" {op} ".join(["causal"] + ["sliding(2)"] * (n - 1)))
    assert check(text) is None
    p = load(text).instantiate()
    # the IR stays flat: one And / Or node, not a 5000-deep tree
    assert p.attend.to_attn().count("(") <= 2 * n + 2
    if n > 2 and op != "|":
        assert isinstance(p.attend, And)
    if n > 2 and op == "|":
        assert isinstance(p.attend, Or)


@settings(max_examples=20)
@given(st.sampled_from(["+", "*", "-"]), st.integers(1, 5000))
def test_flat_arithmetic_chains_of_any_length(op, n):
    m = load(f"let v = {f' {op} '.join(['1'] * n)}\n")
    assert m.constants["v"] == {"+": n, "*": 1, "-": 2 - n}[op]


def test_issue_chain_of_490_terms_works():
    for op in "&|+":
        term = "1" if op == "+" else "causal"
        text = f"let v = {' + '.join(['1'] * 490)}\n" if op == "+" else pattern(f" {op} ".join([term] * 490))
        assert check(text) is None


@settings(max_examples=10)
@given(st.integers(1, 5000), st.booleans())
def test_let_chains_of_any_length_in_any_order(n, forward):
    if forward:  # each refers to the one before
        lets = "let a0 = 1\n" + "".join(f"let a{i} = a{i - 1} + 1\n" for i in range(1, n + 1))
    else:  # each refers to the one after (evaluated on demand from a0)
        lets = "".join(f"let a{i} = a{i + 1} + 1\n" for i in range(n)) + f"let a{n} = 1\n"
    last = f"a{n}" if forward else "a0"  # the end of the chain: n + 1
    text = lets + f"pattern p {{\n    tokens n[{last}]\n    attend causal\n}}\n"
    assert check(text) is None
    assert load(text).instantiate().n == n + 1


def macro_chain(n: int) -> str:
    defs = "".join(f"def m{i}(x) = m{i + 1}(x)\n" for i in range(n)) + f"def m{n}(x) = sliding(x)\n"
    return defs + pattern("m0(2)")


@settings(max_examples=30)
@given(st.integers(0, 3 * MAX_EVAL_DEPTH))
def test_macro_chains_up_to_the_evaluation_limit(n):
    err = check(macro_chain(n))
    # attend m0(...) -> m1 -> ... -> mn -> sliding(x) -> x: n + 3 evaluations deep
    if n + 3 <= MAX_EVAL_DEPTH:
        assert err is None, err
    else:
        assert err is not None and "evaluation nested too deeply" in str(err)
        assert all(d.span is not None for d in err.diagnostics)


def test_issue_330_chained_macros_is_a_located_error():
    err = check(macro_chain(330))
    assert err is not None and str(err).startswith("f.attn:") and "nested too deeply" in str(err)


# --- integers ------------------------------------------------------------------------------

@settings(max_examples=80)
@given(st.one_of(st.integers(-(2 ** 70), 2 ** 70),
                 st.sampled_from([MAX_INT, MAX_INT + 1, -MAX_INT, -MAX_INT - 1, 0, 2 ** 63, 10 ** 30])))
def test_integer_literals_are_bounded(v):
    text = f"let v = {'-' if v < 0 else ''}{abs(v)}\n"
    err = check(text)
    if abs(v) <= MAX_INT:
        assert err is None and load(text).constants["v"] == v
    else:
        assert err is not None and "out of range" in str(err) and str(err).startswith("f.attn:1:")


@settings(max_examples=80)
@given(st.integers(-MAX_INT, MAX_INT), st.integers(-MAX_INT, MAX_INT), st.sampled_from(["+", "-", "*"]))
def test_integer_arithmetic_is_bounded(a, b, op):
    text = f"let a = {a}\nlet b = {b}\nlet v = a {op} b\n".replace("= -", "= 0 - ")
    exact = {"+": a + b, "-": a - b, "*": a * b}[op]
    err = check(text)
    if abs(exact) <= MAX_INT:
        assert err is None and load(text).constants["v"] == exact
    else:
        assert err is not None and "out of range" in str(err) and str(err).startswith("f.attn:3:")


@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_issue_huge_literals_are_located_errors_not_value_errors(digits):
    err = check(f"let v = {'9' * digits}\n")
    assert err is not None and "integer literal" in str(err) and str(err).startswith("f.attn:1:9:")


def test_issue_squaring_chain_stops_fast():
    text = "let a0 = 3\n" + "".join(f"let a{i + 1} = a{i} * a{i}\n" for i in range(27))
    start = time.process_time()
    err = check(text)
    assert time.process_time() - start < 2
    assert err is not None and "out of range" in str(err)


def test_parameters_from_python_are_bounded():
    m = load("pattern p(r = 2) {\n    tokens n[16]\n    attend sliding(r)\n}\n")
    with pytest.raises(AttnError, match="out of range"):
        m.instantiate(params={"r": 2 ** 70})
    # accepted, and bound as what it means on 16 tokens: an unbounded window (docs/language.md)
    assert m.instantiate(params={"r": MAX_INT}).attend.to_attn() == "window(before = inf, after = inf)"


def test_float_literal_overflow_is_an_error():
    err = check("let v = 1e999\n")
    assert err is not None and "out of range" in str(err)
    err = check("let v = 1e300 * 1e300\n")
    assert err is not None and "overflows" in str(err)


# --- cost of valid inputs --------------------------------------------------------------------

def test_issue_grid_hint_is_lazy():
    """grid(7) on h[7 * 2**24] built every divisor of 117M for a hint nobody reads (10 s)."""
    start = time.process_time()
    assert check(pattern("grid(7)").replace("n[16]", "h[117440512]")) is None
    assert time.process_time() - start < 2
    err = check(pattern("grid(5)").replace("n[16]", "h[117440512]"))  # the hint, when it is wanted
    assert err is not None and "e.g. 1, 2, 4, 7, 8" in str(err)


def test_issue_long_list_literal_is_fast():
    """200,000 items took 8.5 s (seven parser reductions per item)."""
    text = "let v = [" + ", ".join(str(i % 97) for i in range(200_000)) + "]\n"
    start = time.process_time()
    assert check(text) is None
    assert time.process_time() - start < 4


@settings(max_examples=40)
@given(st.lists(st.integers(0, MAX_INT), min_size=0, max_size=40), st.booleans(), st.booleans())
def test_long_int_lists_mean_what_short_ones_do(xs, newlines, trailing):
    """Lists of 16+ integer literals are lexed as one token: same tree as the general rule
    (forced here with a parenthesised first item)."""
    sep = ",\n    " if newlines else ", "
    body = sep.join(map(str, xs)) + ("," if trailing and xs else "")
    fast = load(f"let v = [{body}]\n")
    slow = load(f"let v = [({xs[0]}){sep}{sep.join(map(str, xs[1:]))}]\n" if xs else "let v = []\n")
    assert fast == slow and fast.constants["v"] == xs


def test_long_int_list_error_points_at_the_item():
    items = ["1"] * 20 + ["9" * 30]
    err = check("let v = [" + ",\n  ".join(items) + "]\n")
    assert err is not None and str(err).startswith("f.attn:21:3:")
