"""The CLI is a client of the library: attnlang/commands/* and cli.py import only public names
(no ``from attnlang.api import _read``), so library internals can move without breaking it."""
from __future__ import annotations

import ast
import pathlib

import attnlang

ROOT = pathlib.Path(attnlang.__file__).parent
CLI_FILES = sorted((ROOT / "commands").glob("*.py")) + [ROOT / "cli.py"]


def test_commands_import_no_private_names():
    bad = []
    for path in CLI_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnlang"):
                bad += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
