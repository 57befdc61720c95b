"""The ``attnlang`` command line through real subprocesses: exit codes, output, no tracebacks."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
GOLDEN = ROOT / "tests" / "golden" / "plan"

# Runtime inputs the examples that read them need for `plan` / `show` (one batch item).
INPUTS = {"packed_docs": ["--input", "doc=3000+4000+1192"], "padding": ["--input", "len=400"]}
# Examples whose paper-size plan is too slow for a unit test are planned at a smaller size.
SMALLER = {"frame_causal": ["--set", "T=6"]}


def _run(*args, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("attnlang", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "attnlang.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "ATTNLANG_DEBUG": ""}, timeout=300)


def attnlang(*args, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    """Run the CLI; no input may ever produce a Python traceback."""
    res = _run(*args, cwd=cwd)
    assert "Traceback" not in res.stderr, res.stderr
    assert "internal error" not in res.stderr, res.stderr
    return res


def patterns_of(path: pathlib.Path) -> list[str]:
    import attnlang

    return attnlang.parse(path).names


# --- every example -------------------------------------------------------------------------
# `check` runs every example file in one subprocess below. `plan` of every example pattern and
# `show` of one per file run the same entry point in-process (no interpreter start-up per call,
# which would dominate the suite's time on 2 cores); the subprocess tests further down cover the
# process boundary: exit codes, stderr, no traceback.

SHOW_LIMIT = 4096  # paper sizes beyond this are shown from a plan; test_show_large_... covers that
EXAMPLE_PATTERNS = [(p, name) for p in EXAMPLES for name in patterns_of(p)] if EXAMPLES else []


def main_in_process(capsys, *args) -> tuple[int, str, str]:
    from attnlang.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_all_examples_one_summary_line():
    res = attnlang("check", *EXAMPLES)
    assert res.returncode == 0, res.stderr
    total = sum(len(patterns_of(p)) for p in EXAMPLES)
    assert res.stdout.splitlines() == [f"{len(EXAMPLES)} files, {total} patterns ok"]


def test_check_reports_every_error_of_every_file(tmp_path):
    typo = tmp_path / "typo.attn"
    typo.write_text("pattern a {\n    tokens n[64]\n    attend causal & slidng(4)\n}\n")
    values = tmp_path / "values.attn"
    values.write_text("pattern a {\n    tokens n[64]\n    attend causal & block(65)\n}\n"
                      "pattern b {\n    tokens h[8], w[8]\n    attend neighborhood(window = (3, 9))\n}\n")
    good = tmp_path / "good.attn"
    good.write_text("pattern g {\n    tokens n[8]\n    attend causal\n}\n")
    res = attnlang("check", typo, values, good, cwd=tmp_path)
    assert res.returncode == 1
    assert res.stdout == ""
    assert f"{typo}:3:21: unknown name 'slidng'; did you mean 'sliding'?" in res.stderr
    assert f"{values}:3:21:" in res.stderr and "65" in res.stderr
    assert f"{values}:7:12:" in res.stderr and "9" in res.stderr
    assert "    attend causal & slidng(4)\n" in res.stderr and "^~~~~~" in res.stderr
    assert "2 of 3 files failed" in res.stderr
    assert ".py" not in res.stderr and "lark" not in res.stderr


@pytest.mark.parametrize("args, words", [
    (["check", "missing.attn"], "missing.attn"),
    (["check", "."], "cannot read"),
    (["show", "examples/swa.attn", "--set", "N"], "NAME=VALUE"),
    (["show", "examples/swa.attn", "--set", "N=(3,"], "not an .attn value"),
    (["show", "examples/swa.attn", "--set", "N=abc"], "axis n has size abc"),
    (["show", "examples/swa.attn", "--set", "Q=3"], "Q"),
    (["show", "examples/swin.attn"], "swin"),
    (["show", "examples/swin.attn", "-p", "swim"], "did you mean 'swin'"),
    (["show", "examples/swa.attn", "--set", "N=64", "--head", "-1"], "--head"),
    (["show", "examples/swa.attn", "--set", "N=64", "--width", "2"], "--width"),
    (["show", "examples/packed_docs.attn", "--set", "N=8"], "--input doc="),
    (["show", "examples/packed_docs.attn", "--set", "N=8", "--input", "doc=3+4"], "add up to 7"),
    (["show", "examples/packed_docs.attn", "--set", "N=8", "--input", "dok=8"], "did you mean 'doc'"),
    (["show", "examples/padding.attn", "--set", "N=8", "--input", "len=9"], "0..8"),
    (["plan", "examples/swa.attn", "--order", "mortn"], "did you mean 'morton'"),
    (["plan", "examples/swa.attn", "--block-m", "0"], "--block-m"),
    (["plan", "examples/swa.attn", "--block-m", "384"], "--block-m 384 is not a supported tile size"),
    (["show", "examples/swin.attn"], "choose one with -p NAME"),
])
def test_bad_input_is_a_diagnostic_not_a_traceback(args, words):
    res = attnlang(*args)
    assert res.returncode == 1, res.stdout
    assert words in res.stderr


def test_no_command_and_unknown_command_exit_2():
    assert attnlang().returncode == 2
    res = attnlang("frobnicate")
    assert res.returncode == 2 and "invalid choice" in res.stderr


# --- show -----------------------------------------------------------------------------------

def test_show_small_pattern_exactly(tmp_path):
    res = attnlang("show", "examples/swa.attn", "--set", "N=6", "--set", "W=2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("swa: N = 6")
    assert [line.strip() for line in lines[1:]] == ["#.....", "##....", ".##...", "..##..", "...##.", "....##"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_show_one_pattern_of_every_example(path, capsys):
    import attnlang as al
    from attnlang.commands.show import cell_size

    name, p = min(((n, al.resolve(path, n)) for n in patterns_of(path)), key=lambda np_: np_[1].n)
    if p.n > SHOW_LIMIT:
        pytest.skip(f"N = {p.n}: see test_show_large_pattern_downsamples_without_dense_mask")
    rc, out, err = main_in_process(capsys, "show", path, "-p", name, "--width", "32", *INPUTS.get(name, []))
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) == len(p.exprs()) * -(-p.n // cell_size(p.n, 32))
    assert all(set(r.strip()) <= set("#+.") for r in rows)


def test_show_large_pattern_downsamples_without_dense_mask():
    res = attnlang("show", "examples/na2d.attn", "-p", "gna_flux", "--width", "32")
    assert res.returncode == 0, res.stderr
    assert "N = 65536" in res.stdout and "downsampled" in res.stdout
    assert len([line for line in res.stdout.splitlines() if line.startswith("  ")]) == 32


def test_show_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "duo.png"
    res = attnlang("show", "examples/duo_heads.attn", "--set", "N=256", "--png", out)
    assert res.returncode == 0, res.stderr
    assert "2 panels" in res.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- fmt ------------------------------------------------------------------------------------

def test_fmt_prints_check_and_write(tmp_path):
    messy = tmp_path / "messy.attn"
    messy.write_text("# a comment\npattern   p(N=64) { tokens n[N]\n attend causal&sliding( 4 ) }  # end\n")
    res = attnlang("fmt", messy)
    assert res.returncode == 0, res.stderr
    canonical = res.stdout
    assert "causal & sliding(4)" in canonical
    assert canonical.startswith("# a comment\n") and canonical.endswith("sliding(4)  # end\n}\n")

    assert attnlang("fmt", "--check", messy).returncode == 1
    res = attnlang("fmt", "--write", messy)
    assert res.returncode == 0, res.stderr
    assert messy.read_text() == canonical
    assert attnlang("fmt", "--check", messy).returncode == 0
    assert attnlang("check", messy).returncode == 0


def test_fmt_several_files_prints_each(tmp_path):
    """`fmt FILE FILE` prints both (the help promised FILE [FILE ...] but it was refused)."""
    res = attnlang("fmt", "examples/swa.attn", "examples/swin.attn")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ROOT / "examples/swa.attn").read_text() + (ROOT / "examples/swin.attn").read_text()


def test_fmt_check_passes_on_every_example():
    res = attnlang("fmt", "--check", *EXAMPLES)
    assert res.returncode == 0, res.stderr


# --- plan -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, name", EXAMPLE_PATTERNS, ids=lambda x: getattr(x, "name", x))
def test_plan_every_example(path, name, capsys):
    rc, out, err = main_in_process(capsys, "plan", path, "-p", name, *INPUTS.get(name, []), *SMALLER.get(name, []))
    assert rc == 0, err
    assert out.startswith(f"plan {name}: N = ")
    assert "visited" in out and "loop nest:" in out


def test_plan_options_reach_the_planner():
    res = attnlang("plan", "examples/swa.attn", "--set", "N=1024", "--block-m", "64", "--block-n", "32", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["block_m"], doc["block_n"]) == (64, 32)
    assert doc["pattern"] == "swa" and doc["tokens"] == {"n": 1024}
    res = attnlang("plan", "examples/packed_docs.attn", "--set", "N=512", "--input", "doc=100+412", "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)["groups"][0]["stats"]
    # Documents of 100 and 412 tokens in 64-token tiles: query tile 0 sees key tile 0, tile 1
    # sees 0..1, tile i >= 2 sees the second document's tiles 1..i: 1 + 2 + (2 + ... + 7) = 30.
    assert (stats["q_tiles"], stats["visited"]) == (8, 30)


GOLDEN_CASES = {
    "swa": ["examples/swa.attn"],
    "swin_shifted": ["examples/swin.attn", "-p", "swin_shifted"],
    "sparse_transformer": ["examples/sparse_transformer.attn"],
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_plan_golden(case, update_golden):
    res = attnlang("plan", *GOLDEN_CASES[case])
    assert res.returncode == 0, res.stderr
    path = GOLDEN / f"{case}.txt"
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(res.stdout)
    assert path.exists(), f"missing {path}: run pytest --update-golden"
    assert res.stdout == path.read_text(), f"plan output changed; if intended, run pytest --update-golden"
