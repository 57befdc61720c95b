"""Subcommands of the ``attnlang`` CLI, one module each.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
:mod:`attnlang.cli` discovers them. Helpers here give every command the same spec options.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from attnlang.api import parse
from attnlang.errors import AttnError
from attnlang.inputs import check_inputs, check_names
from attnlang.planner import BLOCK_SIZES
from attnlang.simulate import SAMPLE_HEAD_DIM
from attnlang.simulate import sample_content as sample


def add_spec_arguments(p: argparse.ArgumentParser, many: bool = False) -> None:
    """``FILE``, ``-p/--pattern NAME`` and repeated ``--set K=V``."""
    if many:
        p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    else:
        p.add_argument("file", metavar="FILE", help="an .attn file")
    p.add_argument("-p", "--pattern", metavar="NAME", help="which pattern, when the file has several")
    p.add_argument("--set", dest="params", action="append", default=[], metavar="K=V",
                   help="override a pattern parameter, e.g. --set N=4096 --set window=(3,7,7)")


_SIZE = re.compile(r"(\d{1,12})([kKmM])")
_UNITS = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}


def parse_value(text: str) -> Any:
    """A ``--set`` value in .attn syntax: ``4096``, ``(3, 7, 7)``, ``true``, ``inf``, ``0..4``,
    ``2 * 128``, ``[1, 2]``, ``0.25``, or a size with a unit as ``--sweep`` takes it (``4k`` =
    4096, ``1M`` = 1024**2); a bare identifier (an axis name) is passed as text."""
    from attnlang.grammar import parse_value as parse_attn_value  # function-level: lark (the CLI starts without it)

    src = text.strip()
    m = _SIZE.fullmatch(src)
    if m:  # 4k = 4096, 1M = 1024**2: the sizes --sweep takes
        return int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return parse_attn_value(src)
    except AttnError as e:
        if src.isidentifier():
            return src
        raise AttnError(f"--set value {text!r} is not an .attn value ({e.diagnostics[0].message})",
                        hint="examples: --set N=4096  --set window=(3,7,7)  --set causal=true") from None


def resolve_pattern(args: argparse.Namespace) -> Any:
    """The pattern ``FILE [-p NAME] [--set K=V]...`` names, bound (as ``attnlang.resolve``), with
    command-line wording when the file has no pattern or several."""
    import pathlib

    module = parse(pathlib.Path(args.file))
    names = module.names
    if args.pattern is None and len(names) != 1:
        if not names:
            raise AttnError(f"{args.file} defines no pattern: nothing to {args.command}",
                            hint="an empty file, or one of only let/def lines, is valid (`attnlang "
                                 "check` accepts it and says it has no pattern), but show, plan, "
                                 "simulate and compile need a `pattern NAME { tokens ...; attend ... }`")
        raise AttnError(f"{args.file} defines {len(names)} patterns; choose one with -p NAME",
                        hint=f"patterns: {', '.join(names)}")
    return module.instantiate(args.pattern, spec_params(args))


def spec_params(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise AttnError(f"--set {item!r} must look like NAME=VALUE", hint="e.g. --set N=4096")
        out[key.strip()] = parse_value(value)
    return out


def check_tile_flags(args: argparse.Namespace) -> None:
    """``--block-m`` / ``--block-n``: refused here, naming the flag, when the planner cannot run them."""
    for flag, v in (("--block-m", getattr(args, "block_m", None)), ("--block-n", getattr(args, "block_n", None))):
        if v is not None and v not in BLOCK_SIZES:
            raise AttnError(f"{flag} {v} is not a supported tile size",
                            hint=f"valid: {', '.join(map(str, BLOCK_SIZES))} tokens (the kernels run "
                                 "power-of-two tiles), e.g. {flag} 64".replace("{flag}", flag))


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Repeated ``--input NAME=VALUE`` for patterns that read runtime inputs (docs/language.md §7)."""
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=VALUE",
                   help="a runtime input for one batch item: ids as document lengths "
                        "(--input doc=100+156) or a list of N ids; a length as an int (--input len=200)")


def spec_inputs(args: argparse.Namespace, pattern: Any) -> dict[str, Any] | None:
    """``--input`` values as numpy arrays for ``pattern`` (None when it reads no inputs).

    ``doc=100+156`` gives ids ``[0]*100 + [1]*156`` (packed documents by length); ``doc=[...]``
    gives the ids as written; ``len=200`` a length.
    """
    import numpy as np

    declared = {i.name: i for i in pattern.inputs}
    given: dict[str, str] = {}
    for item in args.inputs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise AttnError(f"--input {item!r} must look like NAME=VALUE", hint="e.g. --input doc=100+156")
        given[key] = value.strip()
    n = pattern.n
    check_names(pattern, given, spell=lambda name: f"--input {name}=" + (
        f"{n // 2}+{n - n // 2}" if declared[name].kind == "ids" else str(n)))
    if not declared:
        return None
    out = {}
    for name, text in given.items():
        if declared[name].kind == "length":
            v = parse_value(text)
            if not isinstance(v, int) or isinstance(v, bool):
                raise AttnError(f"--input {name}={text}: a length must be an integer in 0..{n}")
            out[name] = np.asarray(v, dtype=np.int64)
        elif "+" in text or text.isdigit():
            parts = text.split("+")
            if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise AttnError(f"--input {name}={text}: document lengths must be positive integers "
                                "joined by '+'", hint=f"e.g. --input {name}={n // 2}+{n - n // 2}")
            lengths = [int(p) for p in parts]
            if sum(lengths) != n:
                raise AttnError(f"--input {name}={text}: document lengths add up to {sum(lengths)}, "
                                f"but the pattern has N = {n} tokens")
            out[name] = np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)
        else:
            v = parse_value(text)
            if (not isinstance(v, (list, tuple)) or len(v) != n
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                raise AttnError(f"--input {name}: ids must be a list of {n} integers or document "
                                "lengths joined by '+'", hint=f"e.g. --input {name}={n // 2}+{n - n // 2}")
            out[name] = v
    return check_inputs(pattern, out, item=True)  # ranges and int64, as every entry point checks them


def sample_content(pattern: Any, seed: int = 0) -> dict | None:
    """:func:`attnlang.simulate.sample_content` for ``plan``/``show``, saying so on stderr.

    The CLI has no tensors, so ``plan``/``show`` of a routed or pyramid pattern (docs/language.md §13)
    show the selection seeded Gaussian Q/K would get (as ``simulate`` plans with); real
    selections come from ``attnlang.compile(...)`` with real tensors. None for static patterns.
    """
    import sys

    if not pattern.reads_content:
        return None
    print(f"note: '{pattern.name}' reads Q/K content; shown for random Gaussian Q/K (seed {seed}, "
          f"D = {SAMPLE_HEAD_DIM}); real selections depend on your tensors", file=sys.stderr)
    return sample(pattern, pattern.heads or 1, seed=seed)
