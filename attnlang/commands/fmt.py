"""``attnlang fmt FILE...``: print, check or rewrite files in canonical form.

    $ attnlang fmt model.attn            # canonical text on stdout (several files: one after another)
    $ attnlang fmt --check *.attn        # exit 1 and name the files that are not canonical
    $ attnlang fmt --write model.attn    # rewrite in place

The canonical form is :meth:`Module.format`; it keeps every ``#`` comment. Before printing or
writing, the result is parsed again and must mean the same (an equal syntax tree) and hold every
comment of the original; if not, that is an attnlang bug and the file is left untouched.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from attnlang.errors import AttnError

NAME = "fmt"
HELP = "print .attn files in canonical form; --check to verify, --write to rewrite in place"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if any file is not in canonical form")
    mode.add_argument("--write", action="store_true", help="rewrite the files in place")


def canonical(path: pathlib.Path) -> tuple[str, str]:
    """(text as read, canonical text) of one file; raises AttnError for a file that does not parse."""
    from attnlang.grammar import load, read_source  # function-level: lark (the CLI starts without it)

    text, name = read_source(path)
    module = load(text, name)
    out = module.format()
    again = load(out, name)
    kept = [c.text for c in again.file.comments]
    if again != module or kept != [c.text for c in module.file.comments]:
        raise RuntimeError(f"fmt would change the meaning or the comments of {name}; file left as is")
    return text, out


def run(args: argparse.Namespace) -> int:
    unformatted = 0
    for name in args.files:
        path = pathlib.Path(name)
        text, out = canonical(path)
        if args.check:
            if out != text:
                unformatted += 1
                print(f"would reformat {name}", file=sys.stderr)
        elif args.write:
            if out != text:
                try:
                    path.write_text(out, encoding="utf-8")
                except OSError as e:
                    raise AttnError(f"cannot write {name}: {e}") from None
                print(f"reformatted {name}", file=sys.stderr)
        else:
            sys.stdout.write(out)
    return 1 if unformatted else 0
