"""Text -> syntax tree (:mod:`attnlang.grammar.ast`), with syntax errors named in words.

>>> from attnlang.grammar.parse import parse_file
>>> f = parse_file("let W = 4\\n", "<string>")
>>> f.items[0].name, f.items[0].value.value
('W', 4)

Parser states never reach the user: an unexpected token becomes "unexpected '&'; expected an
expression", an unclosed bracket "expected ')' to close '(' opened at 3:14".
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from attnlang.errors import AttnError, Diagnostic, Source, Span, did_you_mean
from attnlang.grammar import ast as A
from attnlang.grammar.limits import MAX_INT, MAX_INT_DIGITS, MAX_NESTING

_GRAMMAR = Path(__file__).with_name("attnlang.lark")
_OPEN = {"LPAR": "RPAR", "LSQB": "RSQB"}


class _Brackets:
    """Post-lexer: newlines inside ( ) and [ ] are whitespace; remembers open brackets."""

    always_accept = ("_NL",)

    def __init__(self) -> None:
        self.stack: list[Token] = []
        self.before: list[Token] = []  # open brackets before the token last handed out
        self.prev: Token | None = None  # the token handed out before that one
        self.comments: list[Token] = []  # '#' comments of the text being parsed

    def comment(self, tok: Token) -> Token:
        self.comments.append(tok)
        return tok

    def process(self, stream):
        self.stack, self.before, self.prev = [], [], None
        last = None
        for tok in stream:
            if tok.type == "_NL" and self.stack:
                continue
            self.before = list(self.stack)
            if tok.type in _OPEN:
                self.stack.append(tok)
            elif tok.type in _OPEN.values() and self.stack and _OPEN[self.stack[-1].type] == tok.type:
                self.stack.pop()
            self.prev, last = last, tok
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> tuple[Lark, _Brackets]:
    post = _Brackets()
    # Comments are ignored by the grammar but kept by this callback for the formatter.
    lark = Lark(_GRAMMAR.read_text(), parser="lalr", lexer="contextual", postlex=post,
                propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"COMMENT": post.comment})
    return lark, post


def _span(source: Source, obj: Any) -> Span | None:
    if isinstance(obj, Token):
        return Span(source, obj.line, obj.column, obj.end_line, obj.end_column)
    if obj is None or getattr(obj, "empty", True):
        return None
    return Span(source, obj.line, obj.column, obj.end_line, obj.end_column)


class _ToAst:
    """Builds the frozen AST; every node gets the Span of the text it came from. Each method is
    named after a rule (or alias) of the grammar and takes ``(meta, children)``."""

    def __init__(self, source: Source):
        self.src = source

    def _s(self, x):
        return _span(self.src, x)

    # declarations
    def start(self, meta, items):
        return A.File(tuple(items), self._s(meta))

    def let(self, meta, c):
        return A.Let(str(c[0]), c[1], self._s(meta), self._s(c[0]))

    def def_(self, meta, c):
        params = c[1] if len(c) == 3 else None
        return A.Def(str(c[0]), params, c[-1], self._s(meta), self._s(c[0]))

    def pattern(self, meta, c):
        params = c[1] if len(c) > 1 and isinstance(c[1], tuple) else None
        body = tuple(x for x in c[1 if params is None else 2:] if x is not None)
        return A.PatternDecl(str(c[0]), params, body, self._s(meta), self._s(c[0]))

    def params(self, meta, c):
        return tuple(x for x in c if x is not None)

    def param(self, meta, c):
        return A.Param(str(c[0]), c[1] if len(c) > 1 else None, self._s(meta))

    def tokens(self, meta, c):
        return A.Tokens(tuple(c), self._s(meta))

    def axis_decl(self, meta, c):
        return A.AxisDecl(str(c[0]), c[1], self._s(meta))

    def heads(self, meta, c):
        return A.Heads(c[0], self._s(meta))

    def input(self, meta, c):
        return A.Input(str(c[0]), str(c[1]), c[2] if len(c) > 2 else None, self._s(meta), self._s(c[1]))

    def attend(self, meta, c):
        return A.Attend(c[0], self._s(meta))

    def attend_by_head(self, meta, c):
        return A.AttendByHead(str(c[0]), tuple(x for x in c[1:] if x is not None), self._s(meta),
                              self._s(c[0]))

    def head_branch(self, meta, c):
        return A.HeadBranch(c[0], c[1], self._s(meta))

    def schedule(self, meta, c):
        call = A.Call(str(c[0]), c[1], self._s(meta), self._s(c[0]))
        return A.Schedule(call, self._s(meta))

    # expressions
    def range_expr(self, meta, c):
        return A.RangeExpr(c[0], c[1], self._s(meta))

    def _bin(op):
        def f(self, meta, c):
            return A.BinOp(op, c[0], c[1], self._s(meta))
        return f

    or_op, and_op, sub_op, add_op = _bin("|"), _bin("&"), _bin("-"), _bin("+")
    mul_op, floordiv_op, mod_op = _bin("*"), _bin("//"), _bin("%")

    def not_op(self, meta, c):
        return A.UnaryOp("~", c[0], self._s(meta))

    def neg_op(self, meta, c):
        return A.UnaryOp("-", c[0], self._s(meta))

    def index(self, meta, c):
        return A.Index(c[0], c[1], self._s(meta))

    def call(self, meta, c):
        return A.Call(str(c[0]), c[1], self._s(meta), self._s(c[0]))

    def args(self, meta, c):
        return tuple(x for x in c if x is not None)

    def arg(self, meta, c):
        return A.Arg(None, c[0], self._s(meta))

    def named_arg(self, meta, c):
        return A.Arg(str(c[0]), c[1], self._s(meta))

    def name(self, meta, c):
        return A.Name(str(c[0]), self._s(c[0]))

    def int_lit(self, meta, c):
        return A.IntLit(_int(c[0], self._s(c[0])), self._s(c[0]))

    def int_list_lit(self, meta, c):
        """A long list of integer literals, lexed as one token: ``[0, 1, 2, ...]`` of thousands
        of items parses in linear time instead of seven parser reductions per item."""
        tok, out, whole = c[0], [], self._s(c[0])
        line, base = tok.line, tok.column - 1  # column offset of the token's first line
        for seg in str(tok).split("\n"):
            for m in _DIGITS.finditer(seg):
                digits = m.group()
                if len(digits) > 18:  # maybe out of range: say exactly where
                    col = base + m.start() + 1
                    _int(digits, Span(self.src, line, col, line, col + len(digits)))
                # items share the list's span: no diagnostic points into a literal list item
                out.append(A.IntLit(int(digits), whole))
            line, base = line + 1, 0
        return A.ListLit(tuple(out), self._s(tok))

    def float_lit(self, meta, c):
        v = float(c[0])
        if not math.isfinite(v):
            raise AttnError(Diagnostic(f"float literal {c[0]} is out of range", self._s(c[0]),
                                       "write inf for an unbounded value"))
        return A.FloatLit(v, self._s(c[0]))

    def true_lit(self, meta, c):
        return A.BoolLit(True, self._s(c[0]))

    def false_lit(self, meta, c):
        return A.BoolLit(False, self._s(c[0]))

    def inf_lit(self, meta, c):
        return A.InfLit(self._s(c[0]))

    def tuple_lit(self, meta, c):
        return A.TupleLit(tuple(c), self._s(meta))

    def list_lit(self, meta, c):
        return A.ListLit(tuple(x for x in c if x is not None), self._s(meta))


# `def` is a Python keyword: the callback is looked up by the rule's name.
setattr(_ToAst, "def", _ToAst.def_)

_DIGITS = re.compile(r"\d+")


def _int(text: str, span: Span | None) -> int:
    """An integer literal, refused beyond MAX_INT before Python's int() can choke on it."""
    digits = text.lstrip("0") or "0"
    if len(digits) <= MAX_INT_DIGITS:
        v = int(digits)
        if v <= MAX_INT:
            return v
    shown = text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({len(digits)} digits)"
    raise AttnError(Diagnostic(f"integer literal {shown} is out of range", span,
                               f"integers are limited to 2**62 = {MAX_INT}; write inf for an "
                               "unbounded window"))


# Expression rules: each opens one nesting level (see limits.MAX_NESTING) ...
_LEVEL = {"not_op", "neg_op", "index", "call", "tuple_lit", "list_lit", "range_expr",
          "or_op", "and_op", "sub_op", "add_op", "mul_op", "floordiv_op", "mod_op"}
# ... except the left operand of a binary operator that is itself one: a left-associative chain
# `a & b & c` is one level however long (generated code writes long flat chains).
_BINOPS = {"or_op", "and_op", "sub_op", "add_op", "mul_op", "floordiv_op", "mod_op"}


def _build(tree: Tree, tx: _ToAst) -> Any:
    """Post-order transform with an explicit stack (no recursion: any depth of tree), refusing
    expressions nested deeper than MAX_NESTING at the first node past the limit."""
    done: list[Any] = []
    stack = [(tree, iter(tree.children), [], 0)]
    while stack:
        t, it, kids, depth = stack[-1]
        for child in it:
            if isinstance(child, Tree):
                d = depth
                if child.data in _LEVEL and not (t.data in _BINOPS and child.data in _BINOPS
                                                 and child is t.children[0]):
                    d += 1
                    if d > MAX_NESTING:
                        raise AttnError(Diagnostic(
                            f"expression nested too deeply (more than {MAX_NESTING} levels)",
                            _span(tx.src, child.meta),
                            "name inner parts with `let` or split the expression; a flat chain "
                            "like `a & b & c` may be any length"))
                stack.append((child, iter(child.children), [], d))
                break
            kids.append(child)
        else:
            stack.pop()
            value = getattr(tx, str(t.data))(t.meta, kids)
            (stack[-1][2] if stack else done).append(value)
    return done[0]


def parse_file(text: str, name: str = "<string>") -> A.File:
    """Parse ``.attn`` text into an :class:`~attnlang.grammar.ast.File`; raise :class:`AttnError`
    with a named syntax error (position, source line, caret) on bad input."""
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark some editors write
        text = text[1:]
    source = Source(name, text)
    lark, post = _parser()
    post.comments = []
    try:
        tree = lark.parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as e:
        raise AttnError(_describe(e, source, post, lark)) from None
    f = _build(tree, _ToAst(source))
    comments = tuple(A.Comment(str(c).rstrip(), Span(source, c.line, c.column, c.line, c.column + len(c)))
                     for c in post.comments)
    return A.File(f.items, f.span, comments, source)


def parse_expr(text: str, name: str = "<value>") -> A.Expr:
    """Parse one value expression (e.g. a ``--set K=V`` value) by wrapping it in a ``let``."""
    f = parse_file(f"let _ = {text}\n", name)
    return f.items[0].value


# --- naming syntax errors ---------------------------------------------------------------------

_WORDS = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "_NL": "end of line",
          "$END": "end of file"}
_EXPR_START = {"NAME", "INT", "FLOAT", "TRUE", "FALSE", "INF", "LPAR", "LSQB", "TILDE", "MINUS"}
_STMT_KW = ["tokens", "heads", "input", "attend", "schedule", "let"]
_ITEM_KW = ["let", "def", "pattern"]


def _literal(lark: Lark, term: str) -> str | None:
    for t in lark.terminals:
        if t.name == term and t.pattern.type == "str":
            return t.pattern.value
    return None


def _word(lark: Lark, term: str) -> str:
    if term in _WORDS:
        return _WORDS[term]
    lit = _literal(lark, term)
    return f"'{lit}'" if lit is not None else term.lower()


def _got(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f"'{tok.value}'"


def _join(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _describe(e: UnexpectedInput, source: Source, post: _Brackets, lark: Lark) -> Diagnostic:
    if isinstance(e, UnexpectedCharacters):
        ch = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else "?"
        span = Span(source, e.line, e.column, e.line, e.column + 1)
        if ch in "\"'":
            return Diagnostic(f"unexpected character {ch!r}: attnlang has no strings", span,
                              "axis, input and order names are written bare, e.g. causal(t)")
        return Diagnostic(f"unexpected character {ch!r}", span)
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    expected = set(e.accepts or e.expected)
    line, col = tok.line, tok.column
    if tok.type == "$END" or line is None:
        lines = source.text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
    width = max(1, len(str(tok.value))) if tok.type not in ("$END", "_NL") else 1
    span = Span(source, line, col, line, col + width)
    got = _got(tok)
    # An unclosed bracket swallows newlines, so the parser only notices it far away.
    if post.before and tok.type in ("$END", "RBRACE", "RPAR", "RSQB"):
        opener = post.before[-1]
        closer = ")" if opener.type == "LPAR" else "]"
        if _OPEN[opener.type] in expected:
            return Diagnostic(f"expected '{closer}' to close '{opener.value}' opened at "
                              f"{opener.line}:{opener.column}, got {got}", span)
    keywords = {_literal(lark, t) for t in expected} - {None}
    if tok.type == "NAME" and keywords & {"def", "pattern"} and "NAME" not in expected:
        return Diagnostic(f"unexpected '{tok.value}' at file level{did_you_mean(tok.value, _ITEM_KW)}",
                          span, "a file holds let, def and pattern declarations")
    if tok.type == "NAME" and keywords & set(_STMT_KW) and "NAME" not in expected:
        return Diagnostic(f"unexpected '{tok.value}' at the start of a statement"
                          f"{did_you_mean(tok.value, _STMT_KW)}", span,
                          "a pattern body holds: tokens, heads, input, attend, schedule and let lines")
    prev = post.prev
    wants_expr = {"NAME", "INT"} <= expected
    missing = tok.type in ("_NL", "$END", "RPAR", "RSQB", "RBRACE", "COMMA")
    if wants_expr and missing and prev is not None and prev.type not in ("_NL", "LPAR", "LSQB", "COMMA"):
        return Diagnostic(f"expected an expression after '{prev.value}', got {got}", span)
    words = []
    if wants_expr:
        words.append("an expression")
        expected -= _EXPR_START
    ops = {t for t in expected if _literal(lark, t) in ("|", "&", "-", "+", "*", "//", "%", "..")}
    if len(ops) >= 3:
        words.append("an operator")
        expected -= ops | {"LSQB", "LPAR"}
    words += sorted(_word(lark, t) for t in expected)
    if not words:
        return Diagnostic(f"unexpected {got}", span)
    if tok.type == "$END" and "'}'" in words:
        return Diagnostic(f"expected '}}' to close the block, got end of file", span)
    return Diagnostic(f"unexpected {got}; expected {_join(words)}", span)
