"""A loaded ``.attn`` file: its constants, macros and patterns, ready to instantiate.

>>> from attnlang.grammar import load
>>> m = load('''
... def local(r) = causal & sliding(r)
... pattern swa(N = 16, r = 2) {
...     tokens n[N]
...     attend local(r)
... }
... ''')
>>> m.names
['swa']
>>> m.instantiate(params={"r": 3}).attend.to_attn()
'causal & sliding(3)'
"""
from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Mapping

from attnlang.errors import AttnError, Diagnostic, Span, did_you_mean
from attnlang.grammar import ast as A
from attnlang.grammar.ast import walk
from attnlang.grammar.check import (
    ERR, Env, Evaluator, bind_args, def_params, from_python, instantiate, length_param, prim_params,
    to_python,
)
from attnlang.grammar.fmt import format_file
from attnlang.grammar.parse import parse_expr, parse_file
from attnlang.grammar.prims import BUILTINS, NAME_KINDS, PRIMITIVES
from attnlang.pattern import Pattern


class Module:
    """The checked contents of one ``.attn`` file (see :func:`load`)."""

    def __init__(self, file: A.File, prelude: "Module | None", strict: bool = True):
        self.file = file
        self.prelude = prelude
        self.lets: dict[str, A.Let] = {}
        self.defs: dict[str, A.Def] = {}
        self.patterns: dict[str, A.PatternDecl] = {}
        out: list[Diagnostic] = []
        for item in file.items:
            table = self.patterns if isinstance(item, A.PatternDecl) else None
            if table is None:
                other = self.defs if isinstance(item, A.Let) else self.lets
                table = self.lets if isinstance(item, A.Let) else self.defs
                if item.name in table or item.name in other:
                    first = table.get(item.name) or other[item.name]
                    out.append(Diagnostic(f"'{item.name}' is defined twice (first at "
                                          f"{first.name_span.loc()})", item.name_span,
                                          "give the constant or macro another name"))
                    continue
            elif item.name in table:
                out.append(Diagnostic(f"duplicate pattern name '{item.name}' (first at "
                                      f"{table[item.name].name_span.loc()})", item.name_span,
                                      "every pattern of a file needs its own name"))
                continue
            table[item.name] = item
        _check_names(self, out)
        # Name errors stop a strict load; a lenient one keeps them for check(), which reports
        # them together with the value errors of every pattern they do not touch.
        self.name_errors: tuple[Diagnostic, ...] = tuple(out)
        if out and strict:
            raise AttnError(out)

    # -- introspection -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Pattern names in file order."""
        return list(self.patterns)

    @property
    def macros(self) -> dict[str, A.Def]:
        """The file's own ``def`` macros by name (the prelude's are ``load_prelude().macros``)."""
        return dict(self.defs)

    @property
    def constants(self) -> dict[str, Any]:
        """The file's ``let`` constants, evaluated; raises AttnError if one is invalid."""
        ev = Evaluator()
        values = {name: ev.constant(self, let, Env(self)) for name, let in self.lets.items()}
        if ev.out:
            raise AttnError(_dedupe(ev.out))
        return values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Module) and self.file == other.file

    def __hash__(self) -> int:
        return hash(self.file)

    def __repr__(self) -> str:
        return f"Module(patterns={self.names}, constants={list(self.lets)}, macros={list(self.defs)})"

    # -- instantiation -----------------------------------------------------------------------
    def _decl(self, pattern: str | None) -> A.PatternDecl:
        if pattern is None:
            if len(self.patterns) == 1:
                return next(iter(self.patterns.values()))
            if not self.patterns:
                raise AttnError("this file defines no pattern",
                                hint="add `pattern name { tokens ...; attend ... }`")
            raise AttnError(f"this file defines {len(self.patterns)} patterns; choose one with "
                            f"pattern=NAME", hint=f"patterns: {', '.join(self.patterns)}")
        if pattern not in self.patterns:
            raise AttnError(f"no pattern named '{pattern}'{did_you_mean(pattern, self.patterns)}",
                            hint=f"patterns: {', '.join(self.patterns) or '(none)'}")
        return self.patterns[pattern]

    def _given(self, decl: A.PatternDecl, params: Mapping[str, Any]) -> dict[str, Any]:
        names = [p.name for p in decl.params or ()]
        out: list[Diagnostic] = []
        given: dict[str, Any] = {}
        for k, v in params.items():
            if k not in names:
                out.append(Diagnostic(
                    f"pattern '{decl.name}' has no parameter '{k}'{did_you_mean(k, names)}",
                    decl.name_span, f"parameters: {', '.join(names) or '(none)'}"))
                continue
            try:
                given[k] = from_python(v)
            except TypeError as e:
                out.append(Diagnostic(f"parameter {k} = {e} is not an attnlang value", decl.name_span,
                                      "valid: integers, booleans, floats, tuples, lists, ranges"))
            except ValueError as e:
                out.append(Diagnostic(f"parameter {k} = {e}", decl.name_span))
        if out:
            raise AttnError(out)
        return given

    def instantiate(self, pattern: str | None = None, params: Mapping[str, Any] = {},
                    n: int | None = None) -> Pattern:
        """Evaluate one pattern with parameter values; raise AttnError with every problem.

        ``n`` binds a parameter without a value when the pattern is 1-D and that parameter is
        its whole length (``tokens n[N]``): the length of the tensors at call time.
        """
        decl = self._decl(pattern)
        ev = Evaluator()
        p = instantiate(ev, self, decl, self._given(decl, params), n)
        if ev.out:
            raise AttnError(_dedupe(ev.out))
        if p is None:  # every path that yields no pattern reports why; keep that invariant loud
            raise AssertionError(f"pattern '{decl.name}' failed without a diagnostic")
        return p

    def needs_length(self, pattern: str | None = None, params: Mapping[str, Any] = {}) -> bool:
        """True iff the pattern is 1-D and its length parameter has no value (``n`` binds it)."""
        decl = self._decl(pattern)
        lp = length_param(decl)
        if lp is None or lp in params:
            return False
        return next(p for p in decl.params if p.name == lp).default is None

    def check(self) -> None:
        """Raise AttnError with every error of the file: instantiates each pattern whose
        parameters all have defaults; for the others checks calls (arity, keywords)."""
        ev = Evaluator(list(self.name_errors))
        if self.name_errors:  # constants and macros may be the broken names: check patterns alone
            broken = [d.span for d in self.name_errors if d.span is not None]
            for decl in self.patterns.values():
                if not any(_inside(sp, decl.span) for sp in broken):
                    _check_decl(self, ev, decl)
            raise AttnError(_dedupe(ev.out))
        for name, let in self.lets.items():
            ev.constant(self, let, Env(self))
        for decl in self.patterns.values():
            _check_decl(self, ev, decl)
        for d in self.defs.values():
            for node in walk(d.body):
                _static_call(self, node, ev.out)
        if ev.out:
            raise AttnError(_dedupe(ev.out))

    def format(self) -> str:
        """Canonical text of the file, comments kept; ``load(m.format()) == m``."""
        return format_file(self.file)


def _inside(inner: Span, outer: Span | None) -> bool:
    return outer is not None and (outer.line, outer.col) <= (inner.line, inner.col) <= (outer.end_line, outer.end_col)


def _check_decl(m: Module, ev: Evaluator, decl: A.PatternDecl) -> None:
    """Instantiate a pattern whose parameters all have defaults; else check its calls only."""
    if all(p.default is not None for p in decl.params or ()):
        try:
            instantiate(ev, m, decl, {}, None)
        except AttnError as e:  # a name of the file it uses is broken: report what was found
            ev.out.extend(d for d in e.diagnostics if d not in ev.out)
    else:
        for node in _walk_pattern(decl):
            _static_call(m, node, ev.out)


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        key = (d.message, d.span.loc() if d.span else None)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# --- static checks (no values needed) ---------------------------------------------------------



def _walk_pattern(decl: A.PatternDecl):
    for p in decl.params or ():
        if p.default is not None:
            yield from walk(p.default)
    for s in decl.body:
        for e in _stmt_exprs(s):
            yield from walk(e)


def _stmt_exprs(s) -> list[A.Expr]:
    if isinstance(s, A.Tokens):
        return [a.size for a in s.axes]
    if isinstance(s, (A.Heads,)):
        return [s.count]
    if isinstance(s, A.Input):
        return [s.size] if s.size is not None else []
    if isinstance(s, A.Attend):
        return [s.expr]
    if isinstance(s, A.AttendByHead):
        return [x for b in s.branches for x in (b.heads, b.expr)]
    if isinstance(s, A.Let):
        return [s.value]
    if isinstance(s, A.Schedule):
        return [a.value for a in s.directive.args] if s.directive.func == "tile" else []
    return []


def _static_call(m: Module, node: A.Expr, out: list[Diagnostic]) -> None:
    """Arity and keyword checks of a call to a known macro or primitive."""
    if not isinstance(node, A.Call):
        return
    owner, decl = Evaluator().lookup_global(m, node.func)
    if isinstance(decl, A.Def):
        bind_args(f"macro {decl.name}", def_params(decl), node.args, node.span, out)
    elif decl is None and node.func in PRIMITIVES:
        bind_args(node.func, prim_params(PRIMITIVES[node.func]), node.args, node.span, out)


def _literal_name_args(m: Module, call: A.Call) -> set[int]:
    """ids of Name nodes that a call takes literally (axis / input names, or maybe-axes)."""
    _, decl = Evaluator().lookup_global(m, call.func)
    if decl is None and call.func in PRIMITIVES:
        params = PRIMITIVES[call.func].params
        out = set()
        for i, a in enumerate(call.args):
            q = next((p for p in params if p.name == a.name), None) if a.name else (
                params[i] if i < len(params) else None)
            if q is not None and q.kind in NAME_KINDS and isinstance(a.value, A.Name):
                out.add(id(a.value))
        return out
    return set()


def _check_names(m: Module, out: list[Diagnostic]) -> None:
    """Unknown names (with did-you-mean) and misplaced statements, before any evaluation."""
    globals_ = set()
    mod = m
    while mod is not None:
        globals_ |= set(mod.lets) | set(mod.defs)
        mod = mod.prelude
    globals_ |= set(PRIMITIVES) | set(BUILTINS)

    def names_in(e: A.Expr, visible: set[str], axes: set[str] | None) -> None:
        literal: set[int] = set()
        for node in walk(e):
            if isinstance(node, A.Call):
                literal |= _literal_name_args(m, node)
                # importance(...) is the value syntax of route's permute_keys, not a name
                if node.func not in visible and node.func != "importance":
                    out.append(Diagnostic(f"unknown name '{node.func}'{did_you_mean(node.func, visible)}",
                                          node.func_span))
                macro = isinstance(Evaluator().lookup_global(m, node.func)[1], A.Def)
                if axes is None and macro:  # a macro's bare argument may be the caller's axis
                    literal |= {id(a.value) for a in node.args if isinstance(a.value, A.Name)}
            elif isinstance(node, A.Name) and id(node) not in literal:
                if node.id not in visible and (axes is None or node.id not in axes):
                    cands = visible | (axes or set())
                    out.append(Diagnostic(f"unknown name '{node.id}'{did_you_mean(node.id, cands)}",
                                          node.span))

    for let in m.lets.values():
        names_in(let.value, globals_, set())
    for d in m.defs.values():
        params = [p.name for p in d.params or ()]
        _dup_params(params, d.params or (), f"macro '{d.name}'", out)
        visible = set(globals_)
        for p in d.params or ():
            if p.default is not None:
                names_in(p.default, visible, set())
            visible.add(p.name)
        names_in(d.body, visible, None)
    for decl in m.patterns.values():
        _check_pattern(decl, globals_, names_in, out)


def _dup_params(names: list[str], params, what: str, out: list[Diagnostic]) -> None:
    seen = set()
    for p in params:
        if p.name in seen:
            out.append(Diagnostic(f"{what}: parameter '{p.name}' is declared twice", p.span))
        seen.add(p.name)


_ONCE = {A.Tokens: "tokens", A.Heads: "heads", A.Attend: "attend", A.AttendByHead: "attend"}


def _check_pattern(decl: A.PatternDecl, globals_: set[str], names_in, out: list[Diagnostic]) -> None:
    _dup_params([p.name for p in decl.params or ()], decl.params or (), f"pattern '{decl.name}'", out)
    visible = set(globals_)
    for p in decl.params or ():
        if p.default is not None:
            names_in(p.default, visible, set())
        visible.add(p.name)
    body = decl.body
    if not body or not isinstance(body[0], A.Tokens):
        toks = [s for s in body if isinstance(s, A.Tokens)]
        if toks:
            out.append(Diagnostic("the tokens line must come first in a pattern", toks[0].span,
                                  "move `tokens ...` to the top of the pattern body"))
        else:
            out.append(Diagnostic(f"missing 'tokens' line in pattern '{decl.name}'", decl.name_span,
                                  "add e.g. `tokens n[N]` or `tokens t[T], h[H], w[W]`"))
    if not any(isinstance(s, (A.Attend, A.AttendByHead)) for s in body):
        out.append(Diagnostic(f"missing 'attend' line in pattern '{decl.name}'", decl.name_span,
                              "add e.g. `attend causal & sliding(256)`"))
    axes = {a.name for s in body if isinstance(s, A.Tokens) for a in s.axes}
    seen: dict[str, A.Stmt] = {}
    inputs: set[str] = set()
    for s in body:
        kw = _ONCE.get(type(s))
        if kw is not None:
            if kw in seen:
                out.append(Diagnostic(f"pattern '{decl.name}' has a second '{kw}' line (first at "
                                      f"{seen[kw].span.loc()})", s.span, f"a pattern has one {kw} line"))
            else:
                seen[kw] = s
        if isinstance(s, A.Input):
            if s.name in inputs:
                out.append(Diagnostic(f"input '{s.name}' is declared twice", s.span))
            inputs.add(s.name)
        for e in _stmt_exprs(s):
            names_in(e, visible, axes)
        if isinstance(s, A.Let):
            visible.add(s.name)


# --- entry points -----------------------------------------------------------------------------

def load(text: str, name: str = "<string>", strict: bool = True) -> Module:
    """Parse and name-check ``.attn`` source text; raise AttnError with every syntax or name
    error. The prelude (``std.attn``) is in scope and may be shadowed.

    ``strict=False`` keeps name errors for :meth:`Module.check` (``attnlang check``), which then
    reports them together with the errors of the patterns they do not touch."""
    return Module(parse_file(text, name), load_prelude(), strict)


@functools.lru_cache(maxsize=1)
def load_prelude() -> Module:
    """The standard prelude ``std.attn`` (paper patterns as macros), loaded once."""
    text = resources.files("attnlang").joinpath("std.attn").read_text(encoding="utf-8")
    return Module(parse_file(text, "std.attn"), None)


def parse_value(text: str, name: str = "<value>") -> Any:
    """Evaluate a constant expression given as text (``"(3, 7, 7)"``, ``"inf"``, ``"0..4"``) —
    e.g. the value of ``--set K=V`` — to a value ``Module.instantiate(params=...)`` accepts.

    >>> parse_value("(3, 7, 7)"), parse_value("2 * 128"), parse_value("[1, 2]")
    ((3, 7, 7), 256, [1, 2])
    """
    expr = parse_expr(text, name)
    ev = Evaluator()
    v = ev.eval(expr, Env(load_prelude()))
    if ev.out:
        raise AttnError(ev.out)
    return to_python(v, keep_lists=True)
