"""Parser tables: each syntax construct of docs/language.md §2-§8 -> its syntax tree."""
import pytest

from attnlang.errors import AttnError
from attnlang.grammar import ast as A
from attnlang.grammar.parse import parse_file


def expr(text: str) -> A.Expr:
    return parse_file(f"let x = {text}\n").items[0].value


def I(v):  # noqa: E743 - short helpers keep the table readable
    return A.IntLit(v)


def N(s):
    return A.Name(s)


def call(f, *args, **kw):
    return A.Call(f, tuple(A.Arg(None, a) for a in args) + tuple(A.Arg(k, v) for k, v in kw.items()))


EXPRESSIONS = [
    ("256", I(256)),
    ("0.25", A.FloatLit(0.25)),
    ("1e-3", A.FloatLit(1e-3)),
    ("true", A.BoolLit(True)),
    ("false", A.BoolLit(False)),
    ("inf", A.InfLit()),
    ("W", N("W")),
    ("(3, 7, 7)", A.TupleLit((I(3), I(7), I(7)))),
    ("(3,)", A.TupleLit((I(3),))),
    ("(3)", I(3)),
    ("[1, 2]", A.ListLit((I(1), I(2)))),
    ("[]", A.ListLit(())),
    ("xs[1]", A.Index(N("xs"), I(1))),
    ("[(1, 2), (3, 4)][L % 2]", A.Index(A.ListLit((A.TupleLit((I(1), I(2))), A.TupleLit((I(3), I(4))))),
                                        A.BinOp("%", N("L"), I(2)))),
    ("a + b * c", A.BinOp("+", N("a"), A.BinOp("*", N("b"), N("c")))),
    ("a - b - c", A.BinOp("-", A.BinOp("-", N("a"), N("b")), N("c"))),
    ("a // 2 % 3", A.BinOp("%", A.BinOp("//", N("a"), I(2)), I(3))),
    ("-a * 2", A.BinOp("*", A.UnaryOp("-", N("a")), I(2))),
    ("min(a, 2)", call("min", N("a"), I(2))),
    ("0..N", A.RangeExpr(I(0), N("N"))),
    ("0..N // 2", A.RangeExpr(I(0), A.BinOp("//", N("N"), I(2)))),
    ("causal", N("causal")),
    ("causal(t)", call("causal", N("t"))),
    ("block(32)", call("block", I(32))),
    ("block(size = 32)", call("block", size=I(32))),
    ("window(before = 4, after = inf)", call("window", before=I(4), after=A.InfLit())),
    ("f(1, r = 2,)", call("f", I(1), r=I(2))),
    # precedence: ~ > (& -) > |
    ("a | b & c", A.BinOp("|", N("a"), A.BinOp("&", N("b"), N("c")))),
    ("a & b | c", A.BinOp("|", A.BinOp("&", N("a"), N("b")), N("c"))),
    ("a - b & c", A.BinOp("&", A.BinOp("-", N("a"), N("b")), N("c"))),
    ("~a & b", A.BinOp("&", A.UnaryOp("~", N("a")), N("b"))),
    ("~(a | b)", A.UnaryOp("~", A.BinOp("|", N("a"), N("b")))),
    ("(a | b) & c", A.BinOp("&", A.BinOp("|", N("a"), N("b")), N("c"))),
]


@pytest.mark.parametrize("text, tree", EXPRESSIONS, ids=[t for t, _ in EXPRESSIONS])
def test_expressions(text, tree):
    assert expr(text) == tree


def test_newlines_inside_brackets_are_whitespace():
    src = "pattern p {\n  tokens n[8]\n  attend window(before = 2,\n     after = 3) | keys([0,\n 1])\n}\n"
    att = parse_file(src).items[0].body[1]
    assert att == A.Attend(A.BinOp("|", call("window", before=I(2), after=I(3)),
                                    call("keys", A.ListLit((I(0), I(1))))))


def test_file_items_and_comments():
    src = """# header
let W = 256                       # integer constant
def local(r) = causal & sliding(r)
def video = axial(t)

pattern swa(N = 8192, r = W) {    # parameters with defaults
    tokens n[N]
    attend local(r)
}
pattern bare { tokens n[4]
  attend full }
"""
    items = parse_file(src).items
    assert items[0] == A.Let("W", I(256))
    assert items[1] == A.Def("local", (A.Param("r"),), A.BinOp("&", N("causal"), call("sliding", N("r"))))
    assert items[2] == A.Def("video", None, call("axial", N("t")))
    assert items[3] == A.PatternDecl("swa", (A.Param("N", I(8192)), A.Param("r", N("W"))),
                                     (A.Tokens((A.AxisDecl("n", N("N")),)), A.Attend(call("local", N("r")))))
    assert items[4].name == "bare" and items[4].params is None and len(items[4].body) == 2


def test_pattern_statements():
    src = """pattern p(T = 2, H, W) {
    tokens t[T], h[H], w[W]
    let K = (1, 3, 3)
    heads 8
    input doc: ids[T * H * W]
    input len: length
    attend by head {
        0..6: neighborhood(K) & same(doc)
        6..8: valid(len)
    }
    schedule tile(q = (1, 8, 8), kv = 64)
    schedule order(morton)
}
"""
    body = parse_file(src).items[0].body
    assert [type(s).__name__ for s in body] == ["Tokens", "Let", "Heads", "Input", "Input",
                                                "AttendByHead", "Schedule", "Schedule"]
    assert body[0].axes[1] == A.AxisDecl("h", N("H"))
    assert body[3] == A.Input("doc", "ids", A.BinOp("*", A.BinOp("*", N("T"), N("H")), N("W")))
    assert body[4] == A.Input("len", "length", None)
    assert body[5].branches[1] == A.HeadBranch(A.RangeExpr(I(6), I(8)), call("valid", N("len")))
    assert body[6].directive == call("tile", q=A.TupleLit((I(1), I(8), I(8))), kv=I(64))
    assert body[7].directive == call("order", N("morton"))


def test_keywords_are_contextual():
    # statement keywords are ordinary names where no statement can start
    f = parse_file("pattern pattern {\n tokens tokens[4]\n attend axial(tokens)\n}\nlet input = 3\n")
    assert f.items[0].name == "pattern" and f.items[1].name == "input"


def test_spans_point_at_source():
    f = parse_file("let a = 1\n\npattern p {\n    tokens n[8]\n    attend causal & sliding(2)\n}\n", "x.attn")
    att = f.items[1].body[1]
    s = att.expr.right.span
    assert (s.line, s.col, s.end_col, s.source.name) == (5, 21, 31, "x.attn")
    assert att.expr.right.func_span.end_col == 28


@pytest.mark.parametrize("src", ["let x = 1 +\n", "pattern p {\n", "let = 3\n", "pattern p { tokens n[4] attend full }\n"])
def test_syntax_errors_raise_attn_error(src):
    with pytest.raises(AttnError):
        parse_file(src)
