"""The canonical printer: syntax tree -> ``.attn`` text (``attnlang fmt``).

Layout: one declaration per line, a blank line around every ``def`` and ``pattern`` block,
four-space indentation, ``a = b`` spacing in named arguments and defaults, ``, `` between items,
parentheses only where precedence needs them.

Comments are kept (see :func:`format_file`): a comment on its own line stays before the item or
statement that follows it; a comment at the end of a line stays at the end of that line, at its
column when there is room (aligned comments stay aligned), else two spaces after the code. A
statement written over several lines is printed on one, and the comments inside it move to their
own lines just above it. Blank lines are kept (at most one) between file-level comments and items
and between two ``let``s; inside a block they are dropped.

>>> from attnlang.grammar.parse import parse_file
>>> print(format_file(parse_file("let  W=256\\npattern p { tokens n[W]\\n attend (causal)&sliding( 4 ) }")), end="")
let W = 256
<BLANKLINE>
pattern p {
    tokens n[W]
    attend causal & sliding(4)
}
"""
from __future__ import annotations

from attnlang.grammar import ast as A

# Binding strength of each operator (higher binds tighter); all binary ones are left-assoc.
_PREC = {"..": 1, "|": 2, "&": 3, "-": 3, "+": 3, "*": 4, "//": 4, "%": 4}
_UNARY = 5


def format_expr(e: A.Expr, prec: int = 0) -> str:
    """Print an expression; parenthesise it if it binds looser than ``prec``."""
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.IntLit):
        return str(e.value)
    if isinstance(e, A.FloatLit):
        return repr(e.value)
    if isinstance(e, A.BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, A.InfLit):
        return "inf"
    if isinstance(e, A.TupleLit):
        inner = ", ".join(format_expr(x) for x in e.items)
        return f"({inner},)" if len(e.items) == 1 else f"({inner})"
    if isinstance(e, A.ListLit):
        return "[" + ", ".join(format_expr(x) for x in e.items) + "]"
    if isinstance(e, A.Call):
        return f"{e.func}({format_args(e.args)})"
    if isinstance(e, A.Index):
        return f"{format_expr(e.target, _UNARY + 1)}[{format_expr(e.index)}]"
    if isinstance(e, A.UnaryOp):
        return _wrap(f"{e.op}{format_expr(e.operand, _UNARY)}", _UNARY, prec)
    if isinstance(e, A.RangeExpr):
        p = _PREC[".."]
        return _wrap(f"{format_expr(e.lo, p + 1)}..{format_expr(e.hi, p + 1)}", p, prec)
    if isinstance(e, A.BinOp):
        # A left-deep chain is printed in a loop (any length); a left operand that binds looser
        # than its operator gets parentheses, opened before the leftmost operand.
        ops, first = e.spine()
        opens = sum(_paren(ops[i + 1].op, ops[i].op) for i in range(len(ops) - 1))
        parts = ["(" * opens, format_expr(first, _PREC[ops[-1].op])]
        for i in range(len(ops) - 1, -1, -1):
            b = ops[i]
            right = b.right
            strong = isinstance(right, A.BinOp) and _paren(right.op, b.op)
            parts.append(f" {b.op} {format_expr(right, _UNARY if strong else _PREC[b.op] + 1)}")
            if i > 0 and _paren(b.op, ops[i - 1].op):
                parts.append(")")
        return _wrap("".join(parts), _PREC[e.op], prec)
    raise TypeError(f"not an expression node: {e!r}")


def _paren(inner: str, outer: str) -> bool:
    """Does a left operand with operator ``inner`` need parentheses under ``outer``? Where
    precedence needs them, and for ``&``/``-`` inside ``|`` (``a | (b & c)``), which reads
    ambiguously without them."""
    return _PREC[inner] < _PREC[outer] or (outer == "|" and inner in ("&", "-"))


def _wrap(text: str, own: int, outer: int) -> str:
    return f"({text})" if own < outer else text


def format_args(args: tuple[A.Arg, ...]) -> str:
    return ", ".join(format_expr(a.value) if a.name is None else f"{a.name} = {format_expr(a.value)}"
                     for a in args)


def _params(params: tuple[A.Param, ...] | None) -> str:
    if params is None:
        return ""
    return "(" + ", ".join(p.name if p.default is None else f"{p.name} = {format_expr(p.default)}"
                           for p in params) + ")"


def format_stmt(s: A.Stmt, indent: str = "    ") -> list[str]:
    """A statement's lines (a ``by head`` block has several), without comments."""
    if isinstance(s, A.AttendByHead):
        lines = [f"attend by {s.word} {{"]
        lines += [f"{indent}{format_branch(b)}" for b in s.branches]
        return lines + ["}"]
    return [_stmt_line(s)]


def format_branch(b: A.HeadBranch) -> str:
    return f"{format_expr(b.heads)}: {format_expr(b.expr)}"


def _stmt_line(s: A.Stmt) -> str:
    if isinstance(s, A.Tokens):
        return "tokens " + ", ".join(f"{a.name}[{format_expr(a.size)}]" for a in s.axes)
    if isinstance(s, A.Heads):
        return f"heads {format_expr(s.count)}"
    if isinstance(s, A.Input):
        size = f"[{format_expr(s.size)}]" if s.size is not None else ""
        return f"input {s.name}: {s.kind}{size}"
    if isinstance(s, A.Attend):
        return f"attend {format_expr(s.expr)}"
    if isinstance(s, A.Schedule):
        return f"schedule {s.directive.func}({format_args(s.directive.args)})"
    if isinstance(s, A.Let):
        return f"let {s.name} = {format_expr(s.value)}"
    raise TypeError(f"not a statement node: {s!r}")


def _header(item: A.PatternDecl) -> str:
    return f"pattern {item.name}{_params(item.params)} {{"


def format_item(item: A.Item) -> str:
    """One declaration without comments."""
    if isinstance(item, A.Let):
        return f"let {item.name} = {format_expr(item.value)}"
    if isinstance(item, A.Def):
        return f"def {item.name}{_params(item.params)} = {format_expr(item.body)}"
    lines = [_header(item)]
    for s in item.body:
        lines += ["    " + line for line in format_stmt(s)]
    return "\n".join(lines + ["}"])


# --- comments -----------------------------------------------------------------------------------

class _Comments:
    """The file's comments in source order, handed out as the printer passes their lines."""

    def __init__(self, comments, source):
        self.items = sorted(comments, key=lambda c: (c.span.line, c.span.col))
        self.i = 0
        self.lines = source.text.split("\n") if source is not None else []  # as the lexer counts

    def trailing(self, c: A.Comment) -> bool:
        """True if code precedes the comment on its line."""
        text = self.lines[c.span.line - 1] if c.span.line <= len(self.lines) else ""
        return bool(text[:c.span.col - 1].strip())

    def until(self, line: int) -> list[A.Comment]:
        """The comments not yet printed on lines up to ``line``."""
        start = self.i
        while self.i < len(self.items) and self.items[self.i].span.line <= line:
            self.i += 1
        return self.items[start:self.i]


def _attach(line: str, c: A.Comment) -> str:
    """``line`` with the trailing comment ``c``: at its column if there is room, else 2 spaces on."""
    return line.ljust(max(c.span.col - 1, len(line) + 2)) + c.text


def _construct(cs: _Comments, lines: list[str], first: int, last: int, indent: str) -> list[str]:
    """A construct written on source lines ``first..last`` and printed as ``lines`` (its first
    line carries a trailing comment of ``last``): comments inside it go on their own lines above."""
    inner = cs.until(last)
    tail = [c for c in inner if c.span.line == last and cs.trailing(c)]
    out = [indent + c.text for c in inner if c not in tail]
    head = indent + lines[0]
    out.append(_attach(head, tail[0]) if tail else head)
    return out + [indent + line for line in lines[1:]]


def _header_end(item: A.PatternDecl) -> int:
    ends = [item.name_span.end_line] + [p.span.end_line for p in item.params or () if p.span]
    return max(ends)


def _block(cs: _Comments, header: str, first: int, header_end: int, children, end: int,
           indent: str, child) -> list[str]:
    """``header {``, the children (each with the comments before it), ``}``."""
    out = _construct(cs, [header], first, header_end, indent)
    inner = indent + "    "
    for ch in children:
        out += [inner + c.text for c in cs.until(ch.span.line - 1)]
        out += child(ch, inner)
    out += [inner + c.text for c in cs.until(end - 1)]
    close = cs.until(end)
    return out + [_attach(indent + "}", close[0]) if close else indent + "}"]


def _stmt(cs: _Comments, s: A.Stmt, indent: str) -> list[str]:
    if isinstance(s, A.AttendByHead):
        return _block(cs, f"attend by {s.word} {{", s.span.line, s.word_span.end_line, s.branches,
                      s.span.end_line, indent,
                      lambda b, ind: _construct(cs, [format_branch(b)], b.span.line, b.span.end_line, ind))
    return _construct(cs, [_stmt_line(s)], s.span.line, s.span.end_line, indent)


def _item(cs: _Comments, item: A.Item) -> list[str]:
    if isinstance(item, A.PatternDecl):
        return _block(cs, _header(item), item.span.line, _header_end(item), item.body,
                      item.span.end_line, "", lambda s, ind: _stmt(cs, s, ind))
    return _construct(cs, [format_item(item)], item.span.line, item.span.end_line, "")


def format_file(f: A.File) -> str:
    """Canonical text of a whole file, with its comments (``f.comments``)."""
    if not f.comments or any(c.span is None for c in f.comments) or any(i.span is None for i in f.items):
        return _format_plain(f)
    cs = _Comments(f.comments, f.source)
    out: list[str] = []
    prev_end = prev = None  # last source line printed, and the item before
    for item in f.items:
        lead = cs.until(item.span.line - 1)
        first_line = lead[0].span.line if lead else item.span.line
        if prev is not None:
            both_lets = isinstance(item, A.Let) and isinstance(prev, A.Let)
            if not both_lets or first_line - prev_end > 1:
                out.append("")
        last = None
        for c in lead:  # own-line comments before the item: keep one blank line where there was
            if last is not None and c.span.line - last > 1:
                out.append("")
            out.append(c.text)
            last = c.span.line
        if last is not None and item.span.line - last > 1:
            out.append("")
        out += _item(cs, item)
        prev, prev_end = item, item.span.end_line
    rest = cs.until(10 ** 12)
    last = prev_end
    for c in rest:
        if last is not None and c.span.line - last > 1:
            out.append("")
        out.append(c.text)
        last = c.span.line
    return "\n".join(out) + "\n" if out else ""


def _format_plain(f: A.File) -> str:
    out: list[str] = []
    prev = None
    for item in f.items:
        if prev is not None and not (isinstance(item, A.Let) and isinstance(prev, A.Let)):
            out.append("")
        out.append(format_item(item))
        prev = item
    return "\n".join(out) + "\n" if out else ""
