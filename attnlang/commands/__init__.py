"""Subcommands of the ``attnlang`` CLI, one module each.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
:mod:`attnlang.cli` discovers them. Helpers here give every command the same spec options.
"""
from __future__ import annotations

import argparse
import ast
from typing import Any

from attnlang.errors import AttnError


def add_spec_arguments(p: argparse.ArgumentParser, many: bool = False) -> None:
    """``FILE``, ``-p/--pattern NAME`` and repeated ``--set K=V``."""
    if many:
        p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    else:
        p.add_argument("file", metavar="FILE", help="an .attn file")
    p.add_argument("-p", "--pattern", metavar="NAME", help="which pattern, when the file has several")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="K=V",
                   help="override a pattern parameter, e.g. --set N=4096 --set window=(3,7,7)")


def parse_value(text: str) -> Any:
    """A ``--set`` value: an int, bool, float, tuple or list in .attn syntax."""
    src = text.strip().replace("true", "True").replace("false", "False")
    try:
        return ast.literal_eval(src)
    except (ValueError, SyntaxError):
        raise AttnError(f"--set value {text!r} is not a number, boolean, tuple or list",
                        hint="examples: --set N=4096  --set window=(3,7,7)  --set causal=true") from None


def spec_params(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise AttnError(f"--set {item!r} must look like NAME=VALUE", hint="e.g. --set N=4096")
        out[key.strip()] = parse_value(value)
    return out
