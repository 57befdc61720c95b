"""Diagnostics: source spans, rendered errors and did-you-mean suggestions.

Every user-facing error in attnlang is an :class:`AttnError` holding one or more
:class:`Diagnostic`s. A diagnostic with a span renders as ``file:line:col: message``
followed by the source line and a caret, the way compilers do::

    model.attn:4:12: unknown primitive 'slidng'; did you mean 'sliding'?
        attend slidng(256)
               ^~~~~~
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Source:
    """A named piece of source text (a file or a string given to the API)."""

    name: str  # file path as the user gave it, or "<string>"
    text: str = field(repr=False)

    def line(self, lineno: int) -> str:
        # lines end at "\n" only, as the lexer counts them (str.splitlines also splits at \f,
        # \v, \x1c, \u2028, ..., which would put the caret under another line)
        lines = self.text.split("\n")
        return lines[lineno - 1].rstrip("\r") if 0 < lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """Where a node came from: 1-based line/column of its first and last character."""

    source: Source | None
    line: int
    col: int
    end_line: int
    end_col: int  # exclusive

    def __repr__(self) -> str:
        name = self.source.name if self.source else "?"
        return f"Span({name}:{self.line}:{self.col})"

    def loc(self) -> str:
        name = self.source.name if self.source else "<input>"
        return f"{name}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem: what is wrong, where, and optionally what would be valid."""

    message: str
    span: Span | None = None
    hint: str | None = None  # e.g. "valid: 1 <= stride <= window"

    def render(self) -> str:
        head = f"{self.span.loc()}: {self.message}" if self.span else self.message
        parts = [head]
        if self.span is not None and self.span.source is not None:
            text = self.span.source.line(self.span.line)
            if text:
                width = (
                    max(1, self.span.end_col - self.span.col)
                    if self.span.end_line == self.span.line
                    else max(1, len(text) - self.span.col + 1)
                )
                parts.append("    " + text.rstrip("\n"))
                parts.append("    " + " " * (self.span.col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            parts.append(f"    = {self.hint}")
        return "\n".join(parts)


class AttnError(Exception):
    """A user error with one or more diagnostics; ``str()`` renders them all."""

    def __init__(self, diagnostics: Diagnostic | str | Sequence[Diagnostic], span: Span | None = None,
                 hint: str | None = None):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics, span, hint)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        text = "\n".join(d.render() for d in self.diagnostics)
        n = len(self.diagnostics)
        if n > 1:
            text += f"\n{n} errors"
        return text


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest candidate, or "" when none is close."""
    best = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{best[0]}'?" if best else ""
