"""attnlang's modules import each other without a cycle, function-level imports included.

The graph is read from the source with ``ast`` (nothing is imported), over every module of the
packages that pyproject.toml maps (``attnlang``, ``attnlang.grammar``, ``attnlang.codegen``,
``attnlang.runtime``, ...). What counts as an edge ``A -> B``:

* an ``import B`` or ``from B import name`` statement anywhere in ``A``: at module level, in a
  function or method, in a class body, under ``try``/``if`` — a function-level import is an
  import all the same, it only runs later;
* ``from P import name`` names the module ``P.name`` when that is a module, else ``P`` itself
  (``from attnlang import causal`` is an edge to the ``attnlang`` package's ``__init__``);
* relative imports are resolved against ``A``'s package.

Not edges: imports under ``if TYPE_CHECKING:`` (they never run), the parent packages that Python
initialises on the way to a submodule (every module would otherwise depend on ``attnlang``),
imports of anything outside attnlang, and ``importlib.import_module`` by name (the backend table
``attnlang.runtime.BACKENDS``), which is how the runtime package reaches backends lazily.
"""
from __future__ import annotations

import ast
import pathlib
import tomllib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[2]


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module the wheel ships."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = dict(cfg.get("package-dir", {}))
    out: dict[str, pathlib.Path] = {}
    for pkg, folder in dirs.items():
        root = ROOT / folder
        nested = {pathlib.Path(d) for p, d in dirs.items() if p != pkg and pathlib.Path(d).parent == pathlib.Path(folder)}
        for f in root.rglob("*.py"):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or (root / rel.parts[0]).relative_to(ROOT) in nested:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def edges(mods: dict[str, pathlib.Path]) -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for every import statement between attnlang modules."""
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import attnlang.runtime.call.x` -> the module part
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.append((name, t, node.lineno))
    return out


def test_the_graph_sees_the_packages_and_function_level_imports():
    mods = modules()
    assert {"attnlang", "attnlang.pattern", "attnlang.planner", "attnlang.grammar.check",
            "attnlang.runtime.torch_exec", "attnlang.codegen.triton"} <= set(mods)
    found = {(a, b) for a, b, _ in edges(mods)}
    # api reaches the runtime only inside functions (import attnlang stays free of torch).
    assert ("attnlang.api", "attnlang.runtime.dispatch") in found


def test_no_import_cycle():
    mods = modules()
    g = nx.DiGraph()
    lines: dict[tuple[str, str], int] = {}
    for a, b, line in edges(mods):
        g.add_edge(a, b)
        lines.setdefault((a, b), line)
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    if cycles:
        cycle = nx.find_cycle(g.subgraph(cycles[0]))
        where = ", ".join(f"{a} -> {b} (line {lines[a, b]})" for a, b in cycle)
        raise AssertionError(f"{len(cycles)} import cycle(s) among {cycles}; one of them: {where}")


# The layers, bottom first (docs/architecture.md). A module belongs to the layer of its longest
# matching prefix; it may import its own layer and the layers below, never one above.
LAYERS = [
    ("errors", ["attnlang.errors", "attnlang.version"]),
    ("IR", ["attnlang.pattern", "attnlang.ir", "attnlang.boxes", "attnlang.plan", "attnlang.tiling",
            "attnlang.order", "attnlang.rows", "attnlang.closed_form", "attnlang.targets",
            "attnlang.inputs", "attnlang.pairs"]),  # the one input check; pair counts of a plan
    ("language and static planning", ["attnlang.grammar", "attnlang.passes"]),
    ("content (routing and pyramid oracles)", ["attnlang.routing", "attnlang.pyramid"]),
    ("top of planning", ["attnlang.planner"]),
    ("codegen and simulator", ["attnlang.codegen", "attnlang.simulate", "attnlang.distributed.shard",
                               "attnlang.distributed.report"]),
    ("runtime", ["attnlang.runtime"]),
    ("api", ["attnlang", "attnlang.api", "attnlang.distributed"]),  # ContextParallel is a front door
    ("cli", ["attnlang.cli", "attnlang.commands"]),
]
# Upward edges that remain, each a known debt with its way out (keep this list shrinking).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/e2e/test_imports.py"
    return best[1]


def test_imports_point_down_the_layers():
    up = sorted({(a, b, line) for a, b, line in edges(modules())
                 if layer(b) > layer(a) and (a, b) not in KNOWN_UPWARD})
    assert not up, "imports that point up the layers:\n" + "\n".join(
        f"  {a} ({LAYERS[layer(a)][0]}) -> {b} ({LAYERS[layer(b)][0]}), line {line}" for a, b, line in up)


# ---------------------------------------------------------------------------------------------
# Function-level imports: each one must say why it is not at module level.

HEAVY = ("torch", "triton", "lark", "sympy", "networkx", "matplotlib")
MARKER = "# function-level:"


def function_level_imports(mods: dict[str, pathlib.Path]) -> list[tuple[str, int, str]]:
    """``(module, line, source line)`` of every import of an attnlang module inside a function."""
    out = []
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                    target = child.module if isinstance(child, ast.ImportFrom) else child.names[0].name
                    if (isinstance(child, ast.ImportFrom) and child.level) or (target or "").startswith("attnlang"):
                        out.append((name, child.lineno, lines[child.lineno - 1].strip()))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(text, str(path)), False)
    return out


def test_every_function_level_import_says_why():
    """An import of an attnlang module inside a function is hoisted to module level unless it
    keeps a heavy library (HEAVY) out of ``import attnlang``/the CLI's start, or a layer rule
    forbids the edge at module level; the reason stands on its line after ``# function-level:``."""
    found = function_level_imports(modules())
    assert found, "the walk found no function-level import at all: is it still looking?"
    silent = [f"{m}:{line}: {src}" for m, line, src in found if MARKER not in src]
    assert not silent, (f"function-level imports without a '{MARKER} <why>' comment (hoist them to module "
                        "level unless they keep torch/triton/lark/sympy out of import time):\n  "
                        + "\n  ".join(silent))


def test_importing_attnlang_loads_no_heavy_library():
    """``import attnlang`` (and the runtime and codegen packages, the CLI's commands and its
    argument parser) load none of HEAVY: they load when a pattern is parsed, run or solved."""
    import subprocess
    import sys

    code = ("import sys, attnlang, attnlang.runtime, attnlang.codegen, attnlang.commands, attnlang.cli; "
            "attnlang.cli.build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
