"""Fuzzing the parser and checker: for any input, ``check`` succeeds or raises an AttnError whose
every diagnostic has a ``file:line:col``, within 2 s; never another exception (RecursionError,
ValueError, MemoryError, ...). The CLI never says "internal error" on such files.

Inputs mix grammar-aware generation (files of lets, macros and patterns built from the language's
own names, numbers at and beyond the limits, deep and long expressions) with random mutations of
that text and with arbitrary text. 3,000 examples run by default (about 15 s); ``pytest --fuzz``
runs 100,000, with deeper nesting and longer chains.
"""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlang.errors import AttnError
from attnlang.grammar import load

FUZZ = bool(os.environ.get("ATTNLANG_FUZZ"))
EXAMPLES = 100_000 if FUZZ else 3_000
TIME_LIMIT_S = 2.0
# Depths and chain lengths: past the limits by default; --fuzz goes further. (Longer chains are
# tested on their own in test_lang_limits.py.)
MAX_DEPTH, MAX_CHAIN = (400, 3000) if FUZZ else (160, 300)
LOCATED = re.compile(r"^[^\n:]+:\d+:\d+: ", re.M)

fuzz_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=not FUZZ, database=None,
                         suppress_health_check=list(HealthCheck))

# --- grammar-aware text ------------------------------------------------------------------------

PRIMS = ["full", "none", "causal", "window", "sliding", "neighborhood", "block", "strided", "grid",
         "axial", "halo", "keys", "queries", "global", "sink", "random", "same", "valid", "route",
         "pyramid", "min", "max", "importance"]
PRELUDE = ["longformer", "bigbird", "swa", "streaming", "natten", "swin", "moba", "psa", "vmoba"]
KEYWORDS = ["window", "dilation", "stride", "causal", "size", "shift", "step", "block", "halo",
            "count", "seed", "top", "threshold", "among", "query_block", "scope", "permute_keys",
            "before", "after", "r", "keep", "levels", "segment"]
LOCAL = ["N", "W", "T", "H", "K", "r", "x", "a", "b", "t", "h", "w", "n", "doc", "len", "q", "kv"]
NAMES = st.sampled_from(PRIMS + PRELUDE + LOCAL + ["inf", "true", "false", "head", "natural", "morton"])
BIG = [0, 1, 2, 3, 7, 16, 64, 2 ** 31, 2 ** 62, 2 ** 62 + 1, 2 ** 63, 10 ** 30]


def ints():
    return st.one_of(st.integers(0, 70).map(str), st.sampled_from(BIG).map(str),
                     st.integers(1, 6000).map(lambda d: "9" * d))


def atoms():
    return st.one_of(ints(), NAMES, st.sampled_from(["0.25", "1e-3", "1e999", "2.5"]))


def exprs():
    def extend(inner):
        args = st.lists(st.one_of(inner, st.tuples(st.sampled_from(KEYWORDS), inner).map(lambda t: f"{t[0]} = {t[1]}")),
                        max_size=4).map(", ".join)
        return st.one_of(
            st.tuples(inner, st.sampled_from(["&", "|", "-", "+", "*", "//", "%", ".."]), inner)
            .map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            st.tuples(st.sampled_from(["~", "-"]), inner).map("".join),
            inner.map(lambda e: f"({e})"),
            st.lists(inner, min_size=2, max_size=4).map(lambda xs: "(" + ", ".join(xs) + ")"),
            st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
            st.tuples(st.sampled_from(PRIMS + PRELUDE + ["m", "f"]), args).map(lambda t: f"{t[0]}({t[1]})"),
        )
    return st.recursive(atoms(), extend, max_leaves=5)


def deep():
    """One construct repeated at depths around the limits (and long flat chains)."""
    kinds = [("~" * 1, "", "causal"), ("-", "", "1"), ("min(", ", 1)", "1"), ("(", ", 1)", "1"),
             ("[", "]", "1"), ("causal & (", ")", "causal"), ("[0][", "]", "0")]
    nested = st.tuples(st.sampled_from(kinds), st.integers(0, MAX_DEPTH)).map(
        lambda t: t[0][0] * t[1] + t[0][2] + t[0][1] * t[1])
    chains = st.tuples(st.sampled_from(["&", "|", "+", "-", "*"]), st.integers(1, MAX_CHAIN),
                       st.sampled_from(["causal", "1", "sliding(2)"])).map(
        lambda t: f" {t[0]} ".join([t[2]] * t[1]))
    return st.one_of(nested, chains)


def some_expr():
    return st.one_of(exprs(), exprs(), exprs(), deep())


def statements():
    e = some_expr()
    return st.one_of(
        st.lists(st.tuples(st.sampled_from(["n", "t", "h", "w"]), e), min_size=1, max_size=3).map(
            lambda axes: "tokens " + ", ".join(f"{a}[{x}]" for a, x in axes)),
        e.map(lambda x: f"attend {x}"),
        e.map(lambda x: f"heads {x}"),
        st.tuples(st.sampled_from(["doc", "len"]), st.sampled_from(["ids[N]", "length", "ids", "foo[3]"]))
        .map(lambda t: f"input {t[0]}: {t[1]}"),
        st.tuples(e, e).map(lambda t: f"schedule tile(q = {t[0]}, kv = {t[1]})"),
        st.sampled_from(["natural", "tiled", "morton", "hilbert", "rcm", "mortn"]).map(lambda o: f"schedule order({o})"),
        st.lists(st.tuples(e, e), max_size=3).map(
            lambda bs: "attend by head {\n" + "\n".join(f"        {a}: {b}" for a, b in bs) + "\n    }"),
        st.tuples(st.sampled_from(LOCAL), e).map(lambda t: f"let {t[0]} = {t[1]}"),
    )


def items():
    e = some_expr()
    params = st.lists(st.tuples(st.sampled_from(LOCAL), st.one_of(st.none(), e)), max_size=3).map(
        lambda ps: "(" + ", ".join(n if d is None else f"{n} = {d}" for n, d in ps) + ")")
    body = st.lists(statements(), max_size=3).map(lambda ss: "".join(f"    {s}\n" for s in ss))
    good = st.sampled_from(["tokens n[N]\n    attend causal & sliding(4)\n",
                            "tokens t[T], h[H], w[W]\n    attend neighborhood(window = 3)\n"]).map(lambda s: "    " + s)
    return st.one_of(
        st.tuples(st.sampled_from(LOCAL + ["m", "f"]), e).map(lambda t: f"let {t[0]} = {t[1]}"),
        st.tuples(st.sampled_from(["m", "f", "local"]), st.one_of(st.just(""), params), e)
        .map(lambda t: f"def {t[0]}{t[1]} = {t[2]}"),
        st.tuples(st.sampled_from(["p", "q", "swa"]), st.one_of(st.just(""), params), st.one_of(good, body))
        .map(lambda t: f"pattern {t[0]}{t[1]} {{\n{t[2]}}}"),
        st.sampled_from(["# a comment", "", "\ufeff", "pattern p { tokens n[8]\n attend causal }"]),
    )


def files():
    return st.lists(items(), max_size=3).map("\n".join)


FILES = files()  # built once: building strategies per draw costs more than the checks
MUTATION_CHARS = "(){}[],:=#\n\r\t ..~&|-+*/%_0123456789abcxyz\"'\\\u00e9\ufeff\x00"


@st.composite
def mutated(draw):
    """A generated file with a few random edits: deletions, duplications, insertions."""
    text = draw(FILES)
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        op = draw(st.sampled_from(["delete", "duplicate", "insert"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(st.text(st.sampled_from(MUTATION_CHARS), min_size=1, max_size=6)) + text[i:]
    return text


ANY_TEXT = st.one_of(FILES, mutated(), st.text(max_size=200),
                     st.text(st.sampled_from(MUTATION_CHARS), max_size=200))


# --- the properties ---------------------------------------------------------------------------

def check_text(text: str) -> None:
    """The property: success, or an AttnError whose every diagnostic is located; within 2 s of
    CPU time (process time: other jobs on a shared machine do not count; the garbage collector is
    paused, or a full collection of hypothesis's own heap would be billed to the checker)."""
    gc.disable()
    start = time.process_time()
    try:
        load(text, "fuzz.attn", strict=False).check()
    except AttnError as e:
        rendered = e.render()
        assert e.diagnostics, rendered
        for d in e.diagnostics:
            assert d.span is not None and d.span.line >= 1 and d.span.col >= 1, (text, rendered)
        assert LOCATED.match(rendered), rendered
    finally:
        elapsed = time.process_time() - start
        gc.enable()
    assert elapsed < TIME_LIMIT_S, (elapsed, text[:500])


@fuzz_settings
@given(ANY_TEXT)
def test_check_succeeds_or_reports_a_located_error(text):
    check_text(text)


@settings(max_examples=3 if not FUZZ else 100, deadline=None, derandomize=not FUZZ, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.binary(max_size=200)), min_size=40, max_size=40))
def test_cli_check_never_says_internal_error(tmp_path_factory, blobs):
    """The same inputs as files (plus raw bytes: invalid UTF-8, BOMs) through `attnlang check`."""
    d = tmp_path_factory.mktemp("fuzz")
    paths = []
    for i, b in enumerate(blobs):
        p = d / f"f{i}.attn"
        p.write_bytes(b)
        paths.append(str(p))
    res = subprocess.run([sys.executable, "-m", "attnlang.cli", "check", *paths], capture_output=True,
                         text=True, env={**os.environ, "ATTNLANG_DEBUG": ""}, timeout=300)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
