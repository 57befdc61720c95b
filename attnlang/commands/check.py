"""``attnlang check FILE...``: parse and validate files; print every error, or one summary line.

    $ attnlang check examples/*.attn
    21 files, 31 patterns ok

A file without a pattern (empty, or only ``let``/``def`` lines) is valid; the summary names it
("x.attn defines no pattern"), and ``show``/``plan``/``simulate``/``compile`` refuse it.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from attnlang.errors import AttnError

NAME = "check"
HELP = "check .attn files: report every error (file:line:col), or a one-line summary"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")


def run(args: argparse.Namespace) -> int:
    from attnlang.grammar import load, read_source  # function-level: lark (the CLI starts without it)

    failed, patterns, empty = 0, 0, []
    # Check every file before failing so one run reports all problems of all files.
    for path in args.files:
        try:
            # An argument is a path, never source text; a lenient load lets check() report
            # unknown names together with every other error of the file.
            module = load(*read_source(pathlib.Path(path)), strict=False)
            module.check()
        except AttnError as e:
            failed += 1
            print(e.render(), file=sys.stderr)
            continue
        patterns += len(module.names)
        if not module.names:
            empty.append(path)
    files = len(args.files)
    if failed:
        print(f"{failed} of {files} file{'s' if files != 1 else ''} failed", file=sys.stderr)
        return 1
    # A file without a pattern is valid, but nothing can be shown, planned or compiled from it.
    note = f" ({', '.join(empty)} define{'s' * (len(empty) == 1)} no pattern)" if empty else ""
    print(f"{files} file{'s' if files != 1 else ''}, {patterns} pattern{'s' if patterns != 1 else ''} ok{note}")
    return 0

