"""The canonical printer: syntax tree -> ``.attn`` text (``attnlang fmt``).

Layout: one declaration per line, a blank line around every ``def`` and ``pattern`` block,
four-space indentation, ``a = b`` spacing in named arguments and defaults, ``, `` between items,
parentheses only where precedence needs them. Comments are not kept.

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
        p = _PREC[e.op]
        return _wrap(f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p + 1)}", p, prec)
    raise TypeError(f"not an expression node: {e!r}")


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
    if isinstance(s, A.Tokens):
        return ["tokens " + ", ".join(f"{a.name}[{format_expr(a.size)}]" for a in s.axes)]
    if isinstance(s, A.Heads):
        return [f"heads {format_expr(s.count)}"]
    if isinstance(s, A.Input):
        size = f"[{format_expr(s.size)}]" if s.size is not None else ""
        return [f"input {s.name}: {s.kind}{size}"]
    if isinstance(s, A.Attend):
        return [f"attend {format_expr(s.expr)}"]
    if isinstance(s, A.AttendByHead):
        lines = [f"attend by {s.word} {{"]
        lines += [f"{indent}{format_expr(b.heads)}: {format_expr(b.expr)}" for b in s.branches]
        return lines + ["}"]
    if isinstance(s, A.Schedule):
        return [f"schedule {s.directive.func}({format_args(s.directive.args)})"]
    if isinstance(s, A.Let):
        return [f"let {s.name} = {format_expr(s.value)}"]
    raise TypeError(f"not a statement node: {s!r}")


def format_item(item: A.Item) -> str:
    if isinstance(item, A.Let):
        return f"let {item.name} = {format_expr(item.value)}"
    if isinstance(item, A.Def):
        return f"def {item.name}{_params(item.params)} = {format_expr(item.body)}"
    lines = [f"pattern {item.name}{_params(item.params)} {{"]
    for s in item.body:
        lines += ["    " + line for line in format_stmt(s)]
    return "\n".join(lines + ["}"])


def format_file(f: A.File) -> str:
    """Canonical text of a whole file."""
    out: list[str] = []
    prev = None
    for item in f.items:
        if prev is not None and not (isinstance(item, A.Let) and isinstance(prev, A.Let)):
            out.append("")
        out.append(format_item(item))
        prev = item
    return "\n".join(out) + "\n" if out else ""
