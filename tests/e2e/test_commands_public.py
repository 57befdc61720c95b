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


def test_plan_and_show_sample_the_content_simulate_plans_with(capsys):
    """One sampler: ``attnlang plan``/``show`` show the selection ``simulate`` plans with."""
    import numpy as np

    from attnlang.commands import sample_content as cli_sample
    from attnlang.pattern import Pattern, route
    from attnlang.simulate import sample_content

    p = Pattern.create(route(16, top=2), 64)
    cli, lib = cli_sample(p), sample_content(p, heads=1)
    assert cli.keys() == lib.keys() and all(np.array_equal(cli[k], lib[k]) for k in cli)
    assert "D = 128" in capsys.readouterr().err
