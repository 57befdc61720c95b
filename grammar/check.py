"""The checker: syntax tree -> Pattern IR. Resolves names, evaluates values, expands macros,
type-checks primitive arguments and collects every error of a file.

Values of the language are plain Python values: ``int``, ``float`` (``inf`` is ``math.inf``),
``bool``, ``tuple``, ``list``, :class:`RangeVal` (``lo..hi``), :class:`NameVal` (a bare axis,
input or order name) and pattern expressions (:class:`attnlang.pattern.Expr`).

Scoping is lexical: a macro body sees its parameters, the names of the file it was defined in
(then the prelude, then the primitives) and, when expanded inside a pattern, that pattern's axis
names. Inside a pattern: parameters and earlier ``let``s, then the file, prelude, primitives, axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from attnlang.errors import AttnError, Diagnostic, Span, did_you_mean
from attnlang.grammar import ast as A
from attnlang.grammar.ast import walk
from attnlang.grammar.limits import MAX_EVAL_DEPTH, MAX_INT
from attnlang.grammar.prims import BUILTINS, KINDS, NAME_KINDS, PRIMITIVES, REQUIRED, Primitive
from attnlang.passes.tiles import BLOCK_SIZES
from attnlang.pattern import (
    INF, ORDERS, Axis, ByHead, Expr, HeadRange, Indices, Input, Layout, Pattern, Pyramid, Range, and_,
    not_, or_,
)

if TYPE_CHECKING:
    from attnlang.grammar.module import Module


@dataclass(frozen=True)
class RangeVal:
    """The value of ``lo..hi``."""

    lo: int
    hi: int


@dataclass(frozen=True)
class NameVal:
    """A bare name used as a value: an axis (``causal(t)``), an input or an order name."""

    name: str


PYRAMID_ALONE = "pyramid(...) must be the whole attend expression"
PYRAMID_HINT = "put static constraints in among = ..., e.g. pyramid(..., among = causal)"


class _Error:
    """The value of an expression whose error was already reported (stops error cascades)."""

    def __repr__(self) -> str:
        return "<error>"


ERR = _Error()


def describe(v: Any) -> str:
    """A value as the user would write it, with its type: ``integer 3``, ``tuple (3, 7)``."""
    if isinstance(v, bool):
        return f"boolean {'true' if v else 'false'}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return "inf" if v == INF else f"float {v!r}"
    if isinstance(v, tuple):
        return f"tuple {show(v)}"
    if isinstance(v, list):
        return f"list {show(v)}"
    if isinstance(v, RangeVal):
        return f"range {v.lo}..{v.hi}"
    if isinstance(v, NameVal):
        return f"name '{v.name}'"
    if isinstance(v, (Expr, Pyramid)):
        return f"pattern '{_expr_text(v)}'"
    return repr(v)


def show(v: Any) -> str:
    """A value in ``.attn`` syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v == INF:
        return "inf"
    if isinstance(v, tuple):
        return "(" + ", ".join(show(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, list):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, RangeVal):
        return f"{v.lo}..{v.hi}"
    if isinstance(v, NameVal):
        return v.name
    if isinstance(v, Expr):
        return _expr_text(v)
    return repr(v)


def _expr_text(e: Expr) -> str:
    try:
        return e.to_attn()
    except Exception:  # an unbound node may not print every field; the type is what matters
        return type(e).__name__.lower()


def _magnitude(v: int) -> str:
    digits = len(str(abs(v))) if abs(v).bit_length() < 4000 else int(abs(v).bit_length() * 0.30103)
    return f"about 10**{digits - 1}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def from_python(v: Any) -> Any:
    """Normalise a value given from Python (``compile(spec, r=256)``) to a language value;
    raise ``TypeError`` naming what is valid."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        if not -MAX_INT <= int(v) <= MAX_INT:
            raise ValueError(f"{v} is out of range: integers are limited to 2**62 = {MAX_INT}"
                             " (write inf for an unbounded window)")
        return int(v)
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            raise ValueError("nan is not a number attnlang accepts")
        return float(v)
    if isinstance(v, tuple):
        return tuple(from_python(x) for x in v)
    if isinstance(v, list):
        return [from_python(x) for x in v]
    if isinstance(v, range) and v.step == 1:
        return RangeVal(v.start, v.stop)
    if isinstance(v, str) and v.isidentifier():
        return NameVal(v)
    if isinstance(v, (Expr, RangeVal, NameVal)):
        return v
    raise TypeError(f"{v!r} ({type(v).__name__})")


def to_python(v: Any, keep_lists: bool = False) -> Any:
    """A language value as Python: ranges become ``range``, names ``str``; lists become tuples
    (hashable, as stored in ``Pattern.params``) unless ``keep_lists``."""
    if isinstance(v, list) and keep_lists:
        return [to_python(x, True) for x in v]
    if isinstance(v, (tuple, list)):
        return tuple(to_python(x, keep_lists) for x in v)
    if isinstance(v, RangeVal):
        return range(v.lo, v.hi)
    if isinstance(v, NameVal):
        return v.name
    return v


@dataclass
class Env:
    """Where an expression is evaluated: its module (for file-level names), local values, the
    layout of the pattern being instantiated (for axis names) and the expansion stack."""

    module: "Module"
    locals: dict[str, Any] = field(default_factory=dict)
    layout: Layout | None = None
    stack: tuple[str, ...] = ()

    def child(self, module: "Module", locals: dict[str, Any], name: str) -> "Env":
        return Env(module, locals, self.layout, self.stack + (name,))


# --- argument binding (shared by primitives, macros, builtins and schedule directives) ---------

def bind_args(what: str, params: Iterable[tuple[str, bool]], args: tuple[A.Arg, ...], span: Span | None,
              out: list[Diagnostic]) -> dict[str, A.Arg] | None:
    """Match call arguments to ``params`` (``(name, required)`` in order). Report too many
    arguments, unknown or repeated keywords and missing required ones; None on error."""
    params = list(params)
    names = [n for n, _ in params]
    got: dict[str, A.Arg] = {}
    ok = True
    positional = [a for a in args if a.name is None]
    if len(positional) > len(params):
        extra = positional[len(params)]
        sig = ", ".join(names) if names else "no arguments"
        out.append(Diagnostic(f"{what} takes {len(params)} argument{'s' * (len(params) != 1)} "
                              f"but {len(positional)} were given", extra.span, f"{what}({sig})"))
        ok = False
    for name, a in zip(names, positional):
        got[name] = a
    seen_kw: set[str] = set()
    for a in args:
        if a.name is None:
            continue
        if a.name not in names:
            hint = f"parameters of {what}: {', '.join(names)}" if names else f"{what} takes no arguments"
            out.append(Diagnostic(f"{what} has no parameter '{a.name}'{did_you_mean(a.name, names)}",
                                  a.span, hint))
            ok = False
        elif a.name in seen_kw:
            out.append(Diagnostic(f"{what}: '{a.name}' is given twice", a.span))
            ok = False
        elif a.name in got:
            out.append(Diagnostic(f"{what}: '{a.name}' is given both by position and by name", a.span))
            ok = False
        else:
            got[a.name] = a
        seen_kw.add(a.name)
    if ok:
        missing = [n for n, req in params if req and n not in got]
        if missing:
            sig = ", ".join(names)
            out.append(Diagnostic(f"{what} needs a value for {', '.join(repr(m) for m in missing)}",
                                  span, f"{what}({sig})"))
            ok = False
    return got if ok else None


def prim_params(p: Primitive) -> list[tuple[str, bool]]:
    return [(q.name, q.default is REQUIRED) for q in p.params]


def def_params(d: A.Def) -> list[tuple[str, bool]]:
    return [(q.name, q.default is None) for q in (d.params or ())]


# --- the evaluator --------------------------------------------------------------------------

class Evaluator:
    """Evaluates expressions of one module, appending every problem to ``out``."""

    def __init__(self, out: list[Diagnostic] | None = None):
        self.out: list[Diagnostic] = out if out is not None else []
        self._consts: dict[tuple[int, str], Any] = {}
        self.depth = 0  # evaluations in progress (bounded by MAX_EVAL_DEPTH)
        self._prefetching = False

    def error(self, message: str, span: Span | None, hint: str | None = None) -> Any:
        self.out.append(Diagnostic(message, span, hint))
        return ERR

    # names -----------------------------------------------------------------------------
    def visible(self, env: Env) -> set[str]:
        names = set(env.locals)
        m = env.module
        while m is not None:
            names |= set(m.lets) | set(m.defs)
            m = m.prelude
        names |= set(PRIMITIVES) | set(BUILTINS)
        if env.layout is not None:
            names |= set(env.layout.names)
        return names

    def lookup_global(self, module: "Module", name: str):
        m = module
        while m is not None:
            if name in m.lets:
                return m, m.lets[name]
            if name in m.defs:
                return m, m.defs[name]
            m = m.prelude
        return None, None

    def constant(self, module: "Module", let: A.Let, env: Env) -> Any:
        key = (id(module), let.name)
        if key in self._consts:
            return self._consts[key]
        if f"let {let.name}" in env.stack:
            chain = " -> ".join(s.split()[-1] for s in env.stack[env.stack.index(f"let {let.name}"):])
            return self.error(f"'{let.name}' is defined in terms of itself ({chain} -> {let.name})",
                              let.name_span)
        if not self._prefetching:
            self._prefetch(module, let, env)
        value = self.eval(let.value, Env(module, {}, None, env.stack + (f"let {let.name}",)))
        self._consts[key] = value
        return value

    def _prefetch(self, module: "Module", let: A.Let, env: Env) -> None:
        """Evaluate the constants ``let`` depends on first, dependencies before dependents, so
        a chain of thousands of ``let``s costs no evaluation depth. A cycle is left to the
        evaluation, which reports it."""
        order: list[tuple["Module", A.Let]] = []
        state: dict[tuple[int, str], bool] = {}  # False: on the DFS path, True: finished
        stack = [(module, let, iter(self._let_deps(module, let)))]
        state[(id(module), let.name)] = False
        while stack:
            m, l, deps = stack[-1]
            for dm, dl in deps:
                k = (id(dm), dl.name)
                if k in self._consts or state.get(k) is True:
                    continue
                if k in state:  # a cycle
                    return
                state[k] = False
                stack.append((dm, dl, iter(self._let_deps(dm, dl))))
                break
            else:
                stack.pop()
                state[(id(m), l.name)] = True
                order.append((m, l))
        self._prefetching = True
        try:
            for m, l in order[:-1]:  # the last one is `let` itself
                self.constant(m, l, env)
        finally:
            self._prefetching = False

    def _let_deps(self, module: "Module", let: A.Let):
        for node in walk(let.value):
            if isinstance(node, A.Name):
                m, decl = self.lookup_global(module, node.id)
                if isinstance(decl, A.Let):
                    yield m, decl

    def name(self, node: A.Name, env: Env) -> Any:
        if node.id in env.locals:
            return env.locals[node.id]
        mod, decl = self.lookup_global(env.module, node.id)
        if isinstance(decl, A.Let):
            return self.constant(mod, decl, env)
        if isinstance(decl, A.Def):
            return self.expand(mod, decl, (), node.span, env)
        if node.id in PRIMITIVES:
            return self.primitive(PRIMITIVES[node.id], (), node.span, env)
        if node.id in BUILTINS:
            return self.error(f"{node.id} needs arguments, e.g. {node.id}(a, b)", node.span)
        if env.layout is not None and node.id in env.layout.names:
            return NameVal(node.id)
        return self.error(f"unknown name '{node.id}'{did_you_mean(node.id, self.visible(env))}",
                          node.span)

    # calls -----------------------------------------------------------------------------
    def call(self, node: A.Call, env: Env) -> Any:
        f = node.func
        if f in env.locals:
            return self.error(f"'{f}' is a value ({describe(env.locals[f])}), not a macro; it "
                              "cannot be called", node.func_span)
        mod, decl = self.lookup_global(env.module, f)
        if isinstance(decl, A.Let):
            return self.error(f"'{f}' is a constant (let), not a macro; it cannot be called",
                              node.func_span, "define a macro with `def name(params) = ...`")
        if isinstance(decl, A.Def):
            return self.expand(mod, decl, node.args, node.span, env)
        if f in PRIMITIVES:
            return self.primitive(PRIMITIVES[f], node.args, node.span, env)
        if f in BUILTINS:
            return self.builtin(node, env)
        return self.error(f"unknown name '{f}'{did_you_mean(f, self.visible(env))}", node.func_span)

    def expand(self, module: "Module", d: A.Def, args: tuple[A.Arg, ...], span: Span | None,
               env: Env) -> Any:
        if f"def {d.name}" in env.stack:
            chain = [s.split()[-1] for s in env.stack[env.stack.index(f"def {d.name}"):]]
            return self.error(f"macro '{d.name}' expands to itself "
                              f"({' -> '.join(chain + [d.name])})", span)
        got = bind_args(f"macro {d.name}", def_params(d), args, span, self.out)
        if got is None:
            return ERR
        local: dict[str, Any] = {}
        inner = env.child(module, local, f"def {d.name}")
        n0 = len(self.out)
        for p in d.params or ():
            # arguments are evaluated where they are written; defaults where the macro is
            local[p.name] = self.eval(got[p.name].value, env) if p.name in got else self.eval(p.default, inner)
        value = self.eval(d.body, inner)
        if span is not None:  # say which call an error inside a macro body came from
            for i in range(n0, len(self.out)):
                dg = self.out[i]
                if dg.hint is None and dg.span is not span:
                    self.out[i] = replace(dg, hint=f"in macro '{d.name}' expanded at {span.loc()}")
        return value

    def primitive(self, p: Primitive, args: tuple[A.Arg, ...], span: Span | None, env: Env) -> Any:
        got = bind_args(p.name, prim_params(p), args, span, self.out)
        if got is None:
            return ERR
        values: dict[str, Any] = {}
        bad = False
        for q in p.params:
            if q.name not in got:
                values[q.name] = q.default
                continue
            arg = got[q.name]
            if q.kind == "permute":
                v = self.permute_keys(arg.value, env)
            elif q.kind in NAME_KINDS and isinstance(arg.value, A.Name) and arg.value.id not in env.locals:
                v = NameVal(arg.value.id)  # `causal(t)`: a bare name here is taken literally
            else:
                v = self.eval(arg.value, env)
            v = self.coerce(p.name, q.name, q.kind, v, arg.value.span)
            bad |= v is ERR
            values[q.name] = v
        if bad:
            return ERR
        return p.build(span=span, **values)

    def permute_keys(self, node: A.Expr, env: Env) -> Any:
        """``permute_keys = none | importance(segment = S)``: PBS-Attn's key order (an int S)."""
        if isinstance(node, A.Name) and node.id == "none":
            return None
        if isinstance(node, A.Call) and node.func == "importance":
            got = bind_args("importance", [("segment", True)], node.args, node.span, self.out)
            if got is None:
                return ERR
            v = self.eval(got["segment"].value, env)
            if v is ERR or (_is_int(v) and v >= 1):
                return v
            return self.error(f"importance segment must be a positive integer, got {describe(v)}",
                              got["segment"].value.span)
        return self.error("route permute_keys must be none or importance(segment = S)", node.span,
                          "e.g. permute_keys = importance(segment = 4096)")

    def coerce(self, prim: str, pname: str, kind: str, v: Any, span: Span | None) -> Any:
        """Check ``v`` against a parameter kind; convert to what the IR node stores."""
        if v is ERR:
            return ERR
        ok: Any = None
        if kind == "permute" or (kind == "int_opt" and _is_int(v)):
            return v  # permute_keys is checked where it is read (permute_keys above)
        if kind == "scope" and not (isinstance(v, NameVal) and v.name in ("query", "head")):
            text = v.name if isinstance(v, NameVal) else show(v)
            return self.error(f"{prim} scope '{text}'{did_you_mean(text, ('query', 'head'))} is not valid",
                              span, "valid: scope = query (per query group) or scope = head (joint)")
        if kind == "int" and _is_int(v):
            ok = v
        elif kind == "int_or_inf" and (_is_int(v) or v == INF):
            ok = v
        elif kind == "side" and ((_is_int(v) and v >= 0) or v == INF):
            ok = v
        elif kind == "float" and _is_num(v):
            ok = float(v)
        elif kind == "per_axis_int" and (_is_int(v) or (isinstance(v, tuple) and v and all(map(_is_int, v)))):
            ok = v
        elif kind == "per_axis_bool" and (isinstance(v, bool) or (
                isinstance(v, tuple) and v and all(isinstance(x, bool) for x in v))):
            ok = v
        elif kind in NAME_KINDS and isinstance(v, NameVal):
            ok = v.name
        elif kind == "selection":
            if isinstance(v, RangeVal):
                ok = Range(v.lo, v.hi)
            elif isinstance(v, list) and all(map(_is_int, v)):
                ok = Indices(tuple(v))
        elif kind == "int_list" and isinstance(v, list) and all(map(_is_int, v)):
            ok = v
        elif kind == "float_list" and isinstance(v, list) and all(map(_is_num, v)):
            ok = [float(x) for x in v]
        elif kind == "pattern" and isinstance(v, Expr):
            ok = v
        if ok is not None:
            return ok
        return self.error(f"{prim} {pname} must be {KINDS[kind]}, got {describe(v)}", span)

    def builtin(self, node: A.Call, env: Env) -> Any:
        if any(a.name is not None for a in node.args) or not node.args:
            return self.error(f"{node.func} takes positional numbers, e.g. {node.func}(a, b)", node.span)
        vals = [self.eval(a.value, env) for a in node.args]
        if any(v is ERR for v in vals):
            return ERR
        if len(vals) == 1 and isinstance(vals[0], (tuple, list)) and vals[0]:
            vals = list(vals[0])
        bad = [v for v in vals if not _is_num(v)]
        if bad:
            return self.error(f"{node.func} needs numbers, got {describe(bad[0])}", node.span)
        return min(vals) if node.func == "min" else max(vals)

    # expressions -----------------------------------------------------------------------
    def eval(self, node: A.Expr, env: Env) -> Any:
        if isinstance(node, A.IntLit):
            return node.value
        if isinstance(node, (A.FloatLit, A.BoolLit)):
            return node.value
        if isinstance(node, A.InfLit):
            return INF
        # Macro expansions and constants nest evaluations; a bounded depth keeps the Python stack
        # bounded whatever the file (limits.MAX_EVAL_DEPTH), with the place it was exceeded.
        if self.depth >= MAX_EVAL_DEPTH:
            return self.error(f"evaluation nested too deeply (more than {MAX_EVAL_DEPTH} levels of "
                              "expressions, macro expansions and constants)", node.span,
                              "a macro that calls itself through a long chain of macros? "
                              "flatten the chain or name intermediate values with `let`")
        self.depth += 1
        try:
            return self._eval(node, env)
        finally:
            self.depth -= 1

    def _eval(self, node: A.Expr, env: Env) -> Any:
        if isinstance(node, A.Name):
            return self.name(node, env)
        if isinstance(node, A.Call):
            return self.call(node, env)
        if isinstance(node, A.TupleLit):
            items = tuple(self.eval(x, env) for x in node.items)
            return ERR if ERR in items else items
        if isinstance(node, A.ListLit):
            items = [self.eval(x, env) for x in node.items]
            return ERR if any(x is ERR for x in items) else items
        if isinstance(node, A.RangeExpr):
            lo, hi = self.eval(node.lo, env), self.eval(node.hi, env)
            if lo is ERR or hi is ERR:
                return ERR
            if not (_is_int(lo) and _is_int(hi)):
                return self.error(f"a range needs integer bounds, got {describe(lo)}..{describe(hi)}",
                                  node.span)
            return RangeVal(lo, hi)
        if isinstance(node, A.Index):
            return self.index(node, env)
        if isinstance(node, A.UnaryOp):
            return self.unary(node, env)
        if isinstance(node, A.BinOp):
            return self.binop(node, env)
        raise TypeError(f"not an expression node: {node!r}")

    def index(self, node: A.Index, env: Env) -> Any:
        t, i = self.eval(node.target, env), self.eval(node.index, env)
        if t is ERR or i is ERR:
            return ERR
        if not isinstance(t, (list, tuple)):
            return self.error(f"only lists and tuples can be indexed, got {describe(t)}", node.target.span)
        if not _is_int(i):
            return self.error(f"an index must be an integer, got {describe(i)}", node.index.span)
        if not 0 <= i < len(t):
            return self.error(f"index {i} is outside {show(t)}", node.index.span,
                              f"valid: 0 <= index < {len(t)}")
        return t[i]

    def unary(self, node: A.UnaryOp, env: Env) -> Any:
        v = self.eval(node.operand, env)
        if v is ERR:
            return ERR
        if isinstance(v, Pyramid):
            return self.error(PYRAMID_ALONE, node.span, PYRAMID_HINT)
        if node.op == "~":
            if isinstance(v, Expr):
                return not_(v, span=node.span)
            return self.error(f"'~' complements a pattern, got {describe(v)}", node.operand.span)
        if _is_num(v):
            return -v  # |v| <= MAX_INT already, so -v is too
        if isinstance(v, tuple) and all(map(_is_num, v)):
            return tuple(-x for x in v)
        return self.error(f"'-' negates a number, got {describe(v)}", node.operand.span,
                          "to remove keys from a pattern write `a - b`")

    def binop(self, node: A.BinOp, env: Env) -> Any:
        # A left-deep chain `a & b & c ...` is folded in a loop, however long.
        ops, first = node.spine()
        acc = self.eval(first, env)
        for n in reversed(ops):
            b = self.eval(n.right, env)
            acc = ERR if acc is ERR or b is ERR else self._binop(n, acc, b)
        return acc

    def _binop(self, node: A.BinOp, a: Any, b: Any) -> Any:
        op = node.op
        if isinstance(a, Pyramid) or isinstance(b, Pyramid):
            return self.error(PYRAMID_ALONE, node.span, PYRAMID_HINT)
        pa, pb = isinstance(a, Expr), isinstance(b, Expr)
        if op in ("|", "&") or (op == "-" and (pa or pb)):
            if pa and pb:
                if op == "|":
                    return or_(a, b, span=node.span)
                if op == "&":
                    return and_(a, b, span=node.span)
                return and_(a, not_(b, span=node.right.span), span=node.span)
            bad, where = (b, node.right) if pa else (a, node.left)
            return self.error(f"'{op}' combines two patterns, got {describe(bad)}", where.span,
                              "patterns are primitives like causal or sliding(r), macros, or "
                              "combinations with & | - ~")
        return self.arith(op, a, b, node)

    def arith(self, op: str, a: Any, b: Any, node: A.BinOp) -> Any:
        ta, tb = isinstance(a, tuple), isinstance(b, tuple)
        if ta or tb:  # per-axis arithmetic, a scalar applies to every axis
            if ta and tb and len(a) != len(b):
                return self.error(f"'{op}' on tuples of different lengths: {show(a)} and {show(b)}",
                                  node.span)
            n = len(a) if ta else len(b)
            xs = a if ta else (a,) * n
            ys = b if tb else (b,) * n
            out = tuple(self.arith(op, x, y, node) for x, y in zip(xs, ys))
            return ERR if ERR in out else out
        if not (_is_num(a) and _is_num(b)):
            bad, where = (a, node.left) if not _is_num(a) else (b, node.right)
            return self.error(f"'{op}' needs numbers, got {describe(bad)}", where.span)
        if op in ("//", "%") and b == 0:
            return self.error(f"division by zero: the right side of '{op}' is 0", node.right.span,
                              "a size expression needs a non-zero divisor")
        if op in ("//", "%") and (INF in (a, b) or -INF in (a, b)):
            return self.error(f"'{op}' is undefined for inf", node.span)
        v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else \
            a // b if op == "//" else a % b
        if isinstance(v, float) and math.isinf(v) and not (math.isinf(a) or math.isinf(b)):
            return self.error(f"float result of '{op}' overflows", node.span)
        return self.bounded(v, node)

    def bounded(self, v: Any, node: A.BinOp) -> Any:
        """An arithmetic result, refused (located) when it leaves the language's numbers:
        integers beyond MAX_INT (so `let` chains cannot build huge numbers slowly), or a float
        that overflows or is undefined (``inf - inf``)."""
        if _is_int(v):
            if -MAX_INT <= v <= MAX_INT:
                return v
            return self.error(f"integer result of '{node.op}' is out of range ({_magnitude(v)})", node.span,
                              f"integers are limited to 2**62 = {MAX_INT}; write inf for an "
                              "unbounded window")
        if math.isnan(v):
            return self.error(f"'{node.op}' is undefined here (inf {node.op} inf)", node.span)
        return v


# --- patterns -------------------------------------------------------------------------------

def instantiate(ev: Evaluator, module: "Module", decl: A.PatternDecl, given: Mapping[str, Any],
                n: int | None) -> Any:
    """Evaluate a pattern declaration; return a Pattern, or None after reporting errors."""
    n_errors = len(ev.out)
    env = Env(module)
    for p in decl.params or ():
        if p.name in given:
            env.locals[p.name] = given[p.name]
        elif p.default is not None:
            env.locals[p.name] = ev.eval(p.default, env)
        elif n is not None and length_param(decl) == p.name:
            env.locals[p.name] = int(n)
        else:
            hint = f"give it a default (`{p.name} = ...`) or a value when compiling ({p.name}=...)"
            if length_param(decl) == p.name:
                hint += ", or call with tensors to take it from their length"
            ev.error(f"pattern '{decl.name}' needs a value for parameter '{p.name}'", p.span, hint)
            env.locals[p.name] = ERR
    resolved = tuple((p.name, to_python(env.locals[p.name])) for p in decl.params or ())

    layout = None
    heads: int | None = None
    inputs: list[Input] = []
    attend: Any = None
    tile: dict[str, Any] = {}
    order: str | None = None
    for stmt in decl.body:
        if isinstance(stmt, A.Tokens):
            layout = _layout(ev, stmt, env)
            env.layout = layout
        elif isinstance(stmt, A.Let):
            env.locals[stmt.name] = ev.eval(stmt.value, env)
        elif isinstance(stmt, A.Heads):
            v = ev.eval(stmt.count, env)
            if v is not ERR and not (_is_int(v) and v >= 1):
                ev.error(f"heads must be a positive integer, got {describe(v)}", stmt.count.span)
            elif v is not ERR:
                heads = v
        elif isinstance(stmt, A.Input):
            inp = _input(ev, stmt, env, layout)
            if inp is not None:
                inputs.append(inp)
        elif isinstance(stmt, A.Attend):
            attend = _pattern_value(ev, ev.eval(stmt.expr, env), stmt.expr.span, "attend")
        elif isinstance(stmt, A.AttendByHead):
            attend = _by_head(ev, stmt, env)
        elif isinstance(stmt, A.Schedule):
            order = _schedule(ev, stmt, env, layout, tile, order)
    if len(ev.out) > n_errors or layout is None or attend is None or attend is ERR:
        return None
    try:
        return Pattern.create(attend, layout, name=decl.name, heads=heads, inputs=inputs,
                              tile_q=tile.get("q"), tile_kv=tile.get("kv"), order=order,
                              params=resolved, span=decl.name_span)
    except AttnError as e:
        # a node built inside a prelude macro: also say which line of this file used it
        here = decl.name_span.source if decl.name_span else None
        where = next((s.span for s in decl.body if isinstance(s, (A.Attend, A.AttendByHead))), None)
        ev.out.extend(replace(d, hint=(d.hint + "; " if d.hint else "") + f"used by {where.loc()}")
                      if d.span and where and d.span.source is not here else d
                      for d in e.diagnostics)
        return None


def length_param(decl: A.PatternDecl) -> str | None:
    """The parameter that is a 1-D pattern's whole length (``tokens n[N]`` -> ``N``), if any."""
    toks = [s for s in decl.body if isinstance(s, A.Tokens)]
    params = {p.name for p in decl.params or ()}
    if len(toks) == 1 and len(toks[0].axes) == 1:
        size = toks[0].axes[0].size
        if isinstance(size, A.Name) and size.id in params:
            return size.id
    return None


def _layout(ev: Evaluator, stmt: A.Tokens, env: Env) -> Layout | None:
    axes, ok, seen = [], True, set()
    for ax in stmt.axes:
        v = ev.eval(ax.size, env)
        if ax.name in seen:
            ev.error(f"axis '{ax.name}' is declared twice", ax.span, "axis names must be distinct")
            ok = False
        seen.add(ax.name)
        if v is ERR:
            ok = False
        elif not (_is_int(v) and v >= 1):
            ev.error(f"axis {ax.name} has size {show(v)}; it must be a positive integer", ax.size.span)
            ok = False
        else:
            axes.append(Axis(ax.name, v, span=ax.span))
    return Layout(tuple(axes)) if ok else None


def _input(ev: Evaluator, stmt: A.Input, env: Env, layout: Layout | None) -> Input | None:
    if stmt.kind not in ("ids", "length"):
        ev.error(f"input '{stmt.name}' has unknown kind '{stmt.kind}'"
                 f"{did_you_mean(stmt.kind, ('ids', 'length'))}", stmt.kind_span,
                 f"valid: input {stmt.name}: ids[N] (one id per token) or input {stmt.name}: length")
        return None
    if stmt.kind == "length":
        if stmt.size is not None:
            ev.error(f"a length input takes no size: write `input {stmt.name}: length`", stmt.size.span)
            return None
        return Input(stmt.name, "length", span=stmt.span)
    if stmt.size is None:
        ev.error(f"an ids input needs its size: `input {stmt.name}: ids[N]`", stmt.kind_span)
        return None
    v = ev.eval(stmt.size, env)
    if v is ERR or layout is None:
        return None
    if v != layout.n:
        ev.error(f"input {stmt.name}: ids[{show(v)}] must have one id per token, i.e. {layout.n}",
                 stmt.size.span, f"valid: ids[{layout.n}] for tokens {layout.to_attn()}")
        return None
    return Input(stmt.name, "ids", span=stmt.span)


def _pattern_value(ev: Evaluator, v: Any, span: Span | None, where: str) -> Any:
    if v is ERR or isinstance(v, Expr) or (isinstance(v, Pyramid) and where == "attend"):
        return v
    if isinstance(v, Pyramid):
        return ev.error(f"pyramid(...) must be the whole attend expression, not {where}", span,
                        "a pattern with a pyramid has one attend line; per-head pyramids are not supported")
    return ev.error(f"{where} needs a pattern expression, got {describe(v)}", span,
                    "e.g. causal & sliding(256)")


def _by_head(ev: Evaluator, stmt: A.AttendByHead, env: Env) -> Any:
    if stmt.word != "head":
        return ev.error(f"expected 'attend by head', got 'by {stmt.word}'", stmt.word_span)
    branches, ok = [], True
    for br in stmt.branches:
        r = ev.eval(br.heads, env)
        e = _pattern_value(ev, ev.eval(br.expr, env), br.expr.span, "a head branch")
        if r is not ERR and not isinstance(r, RangeVal):
            ev.error(f"a head branch starts with a head range lo..hi, got {describe(r)}", br.heads.span)
            r = ERR
        if r is ERR or e is ERR:
            ok = False
            continue
        branches.append(HeadRange(r.lo, r.hi, e, span=br.heads.span))
    if not branches and ok:
        return ev.error("`attend by head` needs at least one branch `lo..hi: pattern`", stmt.span)
    return ByHead(tuple(branches), span=stmt.span) if ok else ERR


_DIRECTIVES = {"tile": [("q", False), ("kv", False)], "order": [("order", True)]}


def _schedule(ev: Evaluator, stmt: A.Schedule, env: Env, layout: Layout | None,
              tile: dict[str, Any], order: str | None) -> str | None:
    call = stmt.directive
    if call.func not in _DIRECTIVES:
        ev.error(f"unknown schedule directive '{call.func}'{did_you_mean(call.func, _DIRECTIVES)}",
                 call.func_span, "valid: schedule tile(q = ..., kv = ...), schedule order(name)")
        return order
    got = bind_args(f"schedule {call.func}", _DIRECTIVES[call.func], call.args, call.span, ev.out)
    if got is None:
        return order
    if call.func == "order":
        arg = got["order"].value
        if order is not None:
            ev.error("schedule order is given twice", call.span)
        elif not isinstance(arg, A.Name) or arg.id not in ORDERS:
            text = arg.id if isinstance(arg, A.Name) else "this"
            ev.error(f"unknown order '{text}'{did_you_mean(text, ORDERS)}", arg.span,
                     f"valid orders: {', '.join(ORDERS)}")
        else:
            return arg.id
        return order
    for key, arg in got.items():
        v = ev.eval(arg.value, env)
        if v is ERR:
            continue
        vals = v if isinstance(v, tuple) else (v,)
        if key in tile:
            ev.error(f"schedule tile {key} is given twice", arg.span)
        elif not (vals and all(_is_int(x) and x >= 1 for x in vals)):
            ev.error(f"schedule tile {key} must be a positive integer or a tuple of them, got "
                     f"{describe(v)}", arg.value.span)
        elif layout is not None and len(vals) not in (1, layout.rank):
            ev.error(f"schedule tile {key} = {show(v)} has {len(vals)} entries but the layout "
                     f"{layout.to_attn()} has {layout.rank} axes", arg.value.span,
                     "give one tile size per axis")
        elif _tile_ok(ev, key, v, vals, arg.value.span, layout):
            tile[key] = tuple(vals)
    q, kv = tile.get("q"), tile.get("kv")
    if q and kv and len(q) == len(kv) > 1 and not (all(b % a == 0 for a, b in zip(q, kv))
                                                   or all(a % b == 0 for a, b in zip(q, kv))):
        ev.error(f"schedule tile boxes q = {show(q)} and kv = {show(kv)} do not nest", call.span,
                 "one box must divide the other on every axis, e.g. q = kv")
    return order


def _tile_ok(ev: Evaluator, key: str, v: Any, vals: tuple[int, ...], span: Span | None,
             layout: Layout | None) -> bool:
    """The planner's tile rule, at the line: a tile holds a power of two in 16..256 tokens (the
    kernels' tl.dot blocks); a box's extents may be anything whose product is one."""
    size = math.prod(vals)
    if size in BLOCK_SIZES:
        return True
    valid = ", ".join(map(str, BLOCK_SIZES))
    if len(vals) == 1:
        ev.error(f"schedule tile {key} = {show(v)} is not a supported tile size", span,
                 f"valid: a power of two in {valid} tokens (the kernels run power-of-two tiles)")
    else:
        ev.error(f"schedule tile {key} = {show(v)} holds {size} tokens; a tile box must hold a "
                 f"power of two in {BLOCK_SIZES[0]}..{BLOCK_SIZES[-1]}", span,
                 f"e.g. {show(_pow2_box(vals, layout, BLOCK_SIZES))} (the kernels run power-of-two "
                 "tiles; a box of another volume is not supported yet)")
    return False


def _pow2_box(vals: tuple[int, ...], layout: Layout | None, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The nearest box with a supported volume: extents rounded down to powers of two, then the
    largest halved / the smallest doubled (within its axis) until the volume fits."""
    box = [1 << (max(1, x).bit_length() - 1) for x in vals]
    lens = layout.sizes if layout is not None and layout.rank == len(vals) else (10 ** 9,) * len(vals)
    while math.prod(box) > sizes[-1]:
        i = max(range(len(box)), key=lambda a: box[a])
        box[i] //= 2
    while math.prod(box) < sizes[0]:
        room = [a for a in range(len(box)) if box[a] * 2 <= lens[a]] or list(range(len(box)))
        i = min(room, key=lambda a: box[a])
        box[i] *= 2
    return tuple(box)
