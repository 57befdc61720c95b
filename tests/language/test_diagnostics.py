"""Diagnostics: every error class at its line and column, in words, with no internal names."""
import re

import pytest

from attnlang.errors import AttnError
from attnlang.grammar import load

INTERNAL = re.compile(r"\.py\b|lark|Traceback|Token\(|_NL|RPAR|LPAR|__ANON|\$END")


def errors_of(src: str, params=None, n=None) -> AttnError:
    with pytest.raises(AttnError) as e:
        m = load(src, "f.attn")
        if params is None and n is None:
            m.check()
        else:
            m.instantiate(params=params or {}, n=n)
    return e.value


def body(*lines: str, tokens: str = "n[16]", header: str = "pattern p") -> str:
    return header + " {\n    tokens " + tokens + "\n" + "".join(f"    {ln}\n" for ln in lines) + "}\n"


# (name, source, line, col, words that must appear in the message)
CASES = [
    # syntax, named in words
    ("unclosed paren", "pattern p {\n    tokens n[8]\n    attend window(before = 2,\n}\n", 4, 1,
     ["expected ')' to close '(' opened at 3:18"]),
    ("unclosed bracket", "let x = [1, 2\n", 1, 14, ["expected ']' to close '[' opened at 1:9"]),
    ("dangling operator", body("attend causal &"), 3, 20, ["expected an expression after '&'", "end of line"]),
    ("unexpected operator", body("attend & causal"), 3, 12, ["unexpected '&'", "expected an expression"]),
    ("misspelt statement", body("atend causal"), 3, 5, ["unexpected 'atend'", "did you mean 'attend'"]),
    ("misspelt item", "patern p {\n}\n", 1, 1, ["unexpected 'patern'", "did you mean 'pattern'"]),
    ("string", body("attend causal('t')"), 3, 19, ["attnlang has no strings"]),
    ("unclosed block", "pattern p {\n    tokens n[8]\n    attend full\n", 3, 16, ["expected '}'"]),
    ("missing attend", "pattern p {\n    tokens n[8]\n}\n", 1, 9, ["missing 'attend' line"]),
    ("missing tokens", "pattern p {\n    attend full\n}\n", 1, 9, ["missing 'tokens' line"]),
    ("tokens not first", "pattern p {\n    heads 2\n    tokens n[8]\n    attend full\n}\n", 3, 5,
     ["tokens line must come first"]),
    ("second attend", body("attend full", "attend none"), 4, 5, ["second 'attend' line"]),
    # names
    ("unknown name", body("attend causal & slidng(4)"), 3, 21, ["unknown name 'slidng'", "did you mean 'sliding'"]),
    ("unknown constant", "let W = 4\n" + body("attend sliding(WW)"), 4, 20, ["unknown name 'WW'", "did you mean 'W'"]),
    ("duplicate pattern", body("attend full") + body("attend full"), 5, 9, ["duplicate pattern name 'p'", "first at f.attn:1:9"]),
    ("duplicate let", "let a = 1\nlet a = 2\n", 2, 5, ["'a' is defined twice"]),
    ("duplicate param", "pattern p(N, N) {\n    tokens n[N]\n    attend full\n}\n", 1, 14, ["parameter 'N' is declared twice"]),
    ("calling a constant", "let W = 4\n" + body("attend W(2)"), 4, 12, ["'W' is a constant", "not a macro"]),
    ("self recursion", "def a(x) = b(x)\ndef b(x) = a(x)\n" + body("attend a(1)"), 2, 12, ["expands to itself", "a -> b -> a"]),
    ("typo in a macro body", "def f(r) = sliding(rr)\n", 1, 20, ["unknown name 'rr'", "did you mean 'r'"]),
    ("let cycle", "let a = b + 1\nlet b = a\n" + body("attend sliding(a)"), 1, 5, ["defined in terms of itself"]),
    # arity, keywords
    ("too many args", body("attend sliding(4, 5)"), 3, 23, ["sliding takes 1 argument but 2 were given", "sliding(r)"]),
    ("unknown keyword", body("attend window(befor = 4)"), 3, 19, ["window has no parameter 'befor'", "did you mean 'before'"]),
    ("keyword twice", body("attend window(before = 4, before = 5)"), 3, 31, ["'before' is given twice"]),
    ("positional and keyword", body("attend block(4, size = 2)"), 3, 21, ["given both by position and by name"]),
    ("missing argument", body("attend block(shift = 1)"), 3, 12, ["block needs a value for 'size'"]),
    ("macro arity", "def f(r) = sliding(r)\n" + body("attend f()"), 4, 12, ["macro f needs a value for 'r'"]),
    # types
    ("float to int", body("attend sliding(2.5)"), 3, 20, ["sliding r must be a non-negative integer or inf", "float 2.5"]),
    ("pattern and int", body("attend causal & 4"), 3, 21, ["'&' combines two patterns", "integer 4"]),
    ("attend an int", body("attend 3 + 4"), 3, 12, ["attend needs a pattern expression", "integer 7"]),
    ("bool per axis", body("attend neighborhood(window = 3, causal = 1)"), 3, 46, ["causal must be a boolean"]),
    ("index out of range", body("attend sliding([1, 2][2])"), 3, 27, ["index 2 is outside [1, 2]"]),
    # layout-dependent validation, with the node's span
    ("tuple length", body("attend neighborhood(window = (3, 3, 3))", tokens="h[8], w[8]"), 3, 12,
     ["(3, 3, 3) has 3 entries", "2 axes"]),
    ("unknown axis", body("attend causal(x)", tokens="h[8], w[8]"), 3, 12, ["unknown axis 'x'", "h, w"]),
    ("axis typo", body("attend axial(hh)", tokens="t[2], h[8], w[8]"), 3, 12, ["unknown axis 'hh'", "did you mean 'h'"]),
    ("window larger than axis", body("attend neighborhood(window = 5, dilation = 4)"), 3, 12,
     ["window 5 x dilation 4 = 20 is larger than axis n of size 16"]),
    ("stride > window", body("attend neighborhood(window = 3, stride = 4)"), 3, 12, ["stride 4", "outside 1..window = 3"]),
    ("grid not dividing", body("attend grid(3)", tokens="n[10]"), 3, 12, ["grid size 3 does not divide axis n of size 10", "1, 2, 5, 10"]),
    ("heads overlap", body("heads 4", "attend by head {", "    0..2: causal", "    1..4: full", "}"), 6, 9,
     ["head range 1..4 overlaps"]),
    ("heads gap", body("heads 4", "attend by head {", "    0..2: causal", "    3..4: full", "}"), 6, 9,
     ["heads 2..3 are not covered"]),
    # the caret is on the range to change, not on `attend by head {`
    ("heads short", body("heads 4", "attend by head {", "    0..2: causal", "}"), 5, 9,
     ["heads 2..4 are not covered"]),
    ("heads past", body("heads 4", "attend by head {", "    0..2: causal", "    2..6: full", "}"), 6, 9,
     ["head range 2..6 goes past the pattern's 4 heads"]),
    ("by head without heads", body("attend by head {", "    0..2: causal", "}"), 3, 5, ["needs a `heads n` line"]),
    ("division by zero", "let Z = 0\n" + body("attend full", tokens="n[16 // Z]"), 3, 20, ["division by zero"]),
    ("bad axis size", body("attend full", tokens="n[0]"), 2, 14, ["axis n has size 0", "positive integer"]),
    ("undeclared input", body("attend causal & same(doc)"), 3, 21, ["no input named 'doc' is declared", "input doc: ids[N]"]),
    ("input wrong kind", body("input doc: length", "attend same(doc)"), 4, 12, ["needs an input of kind ids"]),
    ("input size", body("input doc: ids[8]", "attend same(doc)"), 3, 20, ["one id per token, i.e. 16"]),
    ("input kind typo", body("input doc: idss[16]", "attend same(doc)"), 3, 16, ["unknown kind 'idss'", "did you mean 'ids'"]),
    ("bad order", body("attend full", "schedule order(mortn)"), 4, 20, ["unknown order 'mortn'", "did you mean 'morton'"]),
    ("bad directive", body("attend full", "schedule tiles(q = 4)"), 4, 14, ["unknown schedule directive 'tiles'", "did you mean 'tile'"]),
    ("non-integer tile", body("attend full", "schedule tile(q = 2.5)"), 4, 23, ["tile q must be a positive integer"]),
    ("tile rank", body("attend full", "schedule tile(q = (2, 2, 2))", tokens="h[4], w[4]"), 4, 23, ["has 3 entries", "2 axes"]),
    ("error inside a macro", "def f(r) = sliding(r) & grid(r)\n" + body("attend f(3)", tokens="n[10]"), 1, 25,
     ["grid size 3 does not divide axis n of size 10"]),
    ("type error inside a macro", "def f(r) = sliding(r)\n" + body("attend f(0.5)"), 1, 20,
     ["sliding r must be a non-negative integer or inf", "in macro 'f' expanded at f.attn:4:12"]),
]


@pytest.mark.parametrize("name, src, line, col, words", CASES, ids=[c[0] for c in CASES])
def test_error_classes(name, src, line, col, words):
    err = errors_of(src)
    text = str(err)
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (line, col), text
    assert text.startswith(f"f.attn:{line}:{col}: ")
    for w in words:
        assert w in text, text
    assert not INTERNAL.search(text), text
    lines = text.splitlines()
    assert lines[1].strip() and "^" in lines[2]  # the source line and a caret under the bad thing
    assert lines[2].index("^") == 4 + col - 1


def test_missing_parameter_value_on_instantiate():
    err = errors_of("pattern p(N, r) {\n    tokens n[N]\n    attend sliding(r)\n}\n", params={"N": 8})
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (1, 14)
    assert "needs a value for parameter 'r'" in d.message and "r=..." in d.hint


def test_missing_length_mentions_call_time_binding():
    err = errors_of("pattern p(N) {\n    tokens n[N]\n    attend causal\n}\n", params={})
    assert "take it from their length" in str(err)


def test_three_independent_errors_are_all_reported():
    src = ("pattern a {\n    tokens n[16]\n    attend sliding(2.5)\n}\n"
           "pattern b {\n    tokens n[10]\n    attend grid(3)\n}\n"
           "pattern c {\n    tokens n[16 // 0]\n    attend causal\n}\n")
    err = errors_of(src)
    assert [(d.span.line, d.span.col) for d in err.diagnostics] == [(3, 20), (7, 12), (10, 20)]
    assert str(err).endswith("3 errors")


def test_all_name_errors_of_a_file_at_load():
    src = "let a = bb\n" + body("attend slidng(2) | kees(0..2)")
    err = errors_of(src)
    assert [d.span.line for d in err.diagnostics] == [1, 4, 4]


def test_unknown_parameter_from_python():
    err = errors_of("pattern p(N = 8, r = 2) {\n    tokens n[N]\n    attend sliding(r)\n}\n", params={"rr": 1})
    assert "no parameter 'rr'; did you mean 'r'" in str(err)


def test_error_inside_a_prelude_macro_points_back_to_the_file():
    err = errors_of(body("attend bigbird", tokens="n[64]"))
    text = str(err)
    assert text.startswith("std.attn:") and "used by f.attn:3:5" in text


def test_check_reports_name_errors_with_other_patterns_value_errors():
    """A misspelled name in one pattern does not hide the errors of the others."""
    from attnlang.grammar import load

    text = ("pattern a(N = 64) {\n    tokens n[N]\n    attend causal & slidng(4)\n}\n"
            "pattern b {\n    tokens h[8], w[8]\n    attend grid(3)\n}\n"
            "pattern c {\n    tokens n[16]\n    attend causal(x)\n}\n")
    with pytest.raises(AttnError):
        load(text, "f.attn")  # the API's load stays strict
    with pytest.raises(AttnError) as e:
        load(text, "f.attn", strict=False).check()
    msgs = [(d.span.line, d.message) for d in e.value.diagnostics]
    assert any(line == 3 and "slidng" in m for line, m in msgs)
    assert any(line == 7 and "grid size 3" in m for line, m in msgs)
    assert any(line == 11 and "unknown axis 'x'" in m for line, m in msgs)
