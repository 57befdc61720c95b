"""``attnlang fmt FILE...``: print, check or rewrite files in canonical form.

    $ attnlang fmt model.attn            # canonical text on stdout
    $ attnlang fmt --check *.attn        # exit 1 and name the files that are not canonical
    $ attnlang fmt --write model.attn    # rewrite in place

The canonical form is :meth:`Module.format`. It does not keep ``#`` comments, so ``--write``
refuses to rewrite a file whose comments would be lost unless ``--drop-comments`` is given.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

from attnlang.errors import AttnError

NAME = "fmt"
HELP = "print .attn files in canonical form; --check to verify, --write to rewrite in place"

_COMMENT = re.compile(r"#[^\n]*")  # the language has no strings, so every '#' starts a comment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if any file is not in canonical form")
    mode.add_argument("--write", action="store_true", help="rewrite the files in place")
    p.add_argument("--drop-comments", action="store_true", help="with --write: allow losing # comments")


def run(args: argparse.Namespace) -> int:
    from attnlang.api import parse

    if args.drop_comments and not args.write:
        raise AttnError("--drop-comments only applies with --write")
    if len(args.files) > 1 and not (args.check or args.write):
        raise AttnError("give one FILE to print, or use --check / --write for several")
    unformatted = 0
    for name in args.files:
        path = pathlib.Path(name)
        module = parse(path)
        text = path.read_text(encoding="utf-8")
        canonical = module.format()
        if args.check:
            if canonical != text:
                unformatted += 1
                print(f"would reformat {name}", file=sys.stderr)
        elif args.write:
            if canonical == text:
                continue
            lost = [c for c in _COMMENT.findall(text) if c.strip() not in canonical]
            if lost and not args.drop_comments:
                raise AttnError(f"{name}: formatting would drop {len(lost)} comment line(s), "
                                f"e.g. {lost[0].strip()!r}",
                                hint="rerun with --drop-comments to rewrite anyway, or print with "
                                     "`attnlang fmt FILE` to see the canonical text")
            path.write_text(canonical, encoding="utf-8")
            print(f"reformatted {name}", file=sys.stderr)
        else:
            sys.stdout.write(canonical)
    return 1 if unformatted else 0
