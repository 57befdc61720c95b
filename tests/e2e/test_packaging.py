"""The wheel ships every package: the `packages` list in pyproject.toml names each folder that has
an ``__init__.py``, under the name its ``package-dir`` mapping gives it.

An editable install finds packages that the list forgets, so only this test (and CI's wheel
check in ``.ci/run``) catches a missing entry: it once left ``attnlang.commands`` out of the
wheel and the installed ``attnlang`` command failed with ModuleNotFoundError.
"""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _declared() -> tuple[set[str], dict[str, str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), dict(cfg.get("package-dir", {}))


def _on_disk(package_dir: dict[str, str]) -> set[str]:
    found = set()
    # Each mapped root folder, walked for sub-folders that are packages.
    for name, folder in package_dir.items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            sub = ".".join(rel.parts)
            full = f"{name}.{sub}" if sub else name
            found.add(full)
    return found


def test_every_package_folder_is_in_the_wheel():
    declared, package_dir = _declared()
    on_disk = _on_disk(package_dir)
    missing = sorted(on_disk - declared)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(declared - on_disk)
    assert not stale, f"listed in pyproject.toml but no such package folder: {stale}"


def test_package_data_globs_match_files():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = dict(cfg.get("package-dir", {}))
    for pkg, globs in cfg.get("package-data", {}).items():
        folder = ROOT / package_dir.get(pkg, pkg.replace(".", "/"))
        for glob in globs:
            assert list(folder.glob(glob)), f"package-data {pkg}: {glob} matches no file in {folder}"


# The README's first command installs `.[torch]` only: no Triton (about 1 GB, useless on a CPU
# machine except for the interpreter tests) and no matplotlib. The main job must run without them.
_BLOCKED_RUN = """
import runpy, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "matplotlib", "hypothesis", "pytest"):
            raise ImportError(f"{name} is not installed by the README's main command")
sys.meta_path.insert(0, _Block())
for mod in [m for m in sys.modules if m.split(".")[0] in ("triton", "matplotlib")]:
    del sys.modules[mod]
sys.argv = sys.argv[1:]
if sys.argv[0] == "attnlang":
    from attnlang.cli import main
    sys.exit(main(sys.argv[1:]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_main_job_needs_neither_triton_nor_matplotlib():
    import subprocess
    import sys

    for argv in (["attnlang", "plan", "examples/swa.attn"], ["examples/quickstart.py"]):
        res = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (argv, res.stdout[-2000:], res.stderr[-2000:])
        assert "reference" in res.stdout or "tile" in res.stdout
