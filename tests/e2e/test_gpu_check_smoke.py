"""bench/gpu_check.py is the first thing a GPU session runs, and no GPU is at hand to notice when it
rots: its CPU smoke mode (tiny cases through the same code path, Triton's interpreter, fp16/fp32)
runs here."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert (tmp_path / "check.md").exists() and (tmp_path / "check.json").exists()
    checks = json.loads((tmp_path / "check.json").read_text())["checks"]
    assert len(checks) >= 6 and all(c["ok"] for c in checks), checks
