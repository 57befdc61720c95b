"""The ``attnlang`` command line: one subcommand per module of :mod:`attnlang.commands`.

No Python traceback reaches a user for bad input: every :class:`AttnError` is printed as its
diagnostics and the exit code is 1. Set ``ATTNLANG_DEBUG=1`` to see tracebacks of internal errors.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from attnlang import __version__, commands
from attnlang.errors import AttnError


def _commands():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"attnlang.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlang", description="A compiler for attention sparsity patterns.")
    parser.add_argument("--version", action="version", version=f"attnlang {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except AttnError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # an attnlang bug, not bad input: say so plainly
        if os.environ.get("ATTNLANG_DEBUG"):
            raise
        print(f"attnlang: internal error ({type(e).__name__}: {e}); "
              "rerun with ATTNLANG_DEBUG=1 for a traceback and please report it", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
