"""The examples: paper sizes, coverage of every primitive family, semantics on small sizes."""
from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import attnlang
from attnlang.pattern import Pyramid
from attnlang.pattern import (
    Axial, Block, ByHead, Causal, Grid, Halo, Keys, Neighborhood, Queries, Random, Same, Strided,
    Valid, Window,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))


def ex(name: str) -> pathlib.Path:
    return ROOT / "examples" / f"{name}.attn"


def all_patterns():
    for path in EXAMPLES:
        module = attnlang.parse(path)
        for name in module.names:
            yield path, module.instantiate(name)


def test_at_least_twelve_examples_each_with_a_citation():
    assert len(EXAMPLES) >= 12
    for path in EXAMPLES:
        text = path.read_text()
        header = "".join(line for line in text.splitlines() if line.startswith("#"))
        assert text.startswith("#"), f"{path.name} must open with a comment naming its paper"
        assert re.search(r"\b(19|20)\d\d\b", header), f"{path.name}: the header should cite a paper and year"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_checks(path):
    module = attnlang.parse(path)
    module.check()
    assert module.names


def test_examples_cover_every_primitive_family():
    seen: set = set()
    for _, p in all_patterns():
        if isinstance(p.attend, Pyramid):  # a whole attend with no static exprs (docs/language.md §13.2)
            seen.add(Pyramid)
            continue
        for _, _, expr in p.exprs():
            for node in expr.walk():
                seen.add(type(node))
                if isinstance(node, Causal):
                    seen.add("causal(axis)" if node.axis else "causal")
        if isinstance(p.attend, ByHead):
            seen.add(ByHead)
        if p.schedule.tile_q is not None:
            seen.add("schedule")
    wanted = {Window, Neighborhood, Block, Strided, Grid, Axial, Halo, Keys, Queries, Random, Same,
              Valid, ByHead, "causal", "causal(axis)", "schedule"}
    assert wanted <= seen, f"no example uses {wanted - seen}"


PAPER_SIZES = {  # pattern name -> token layout the paper uses
    "swa": (8192,), "streaming": (4096,), "longformer": (4096,), "bigbird": (4096,),
    "swin": (56, 56), "swin_shifted": (56, 56), "maxvit_block": (56, 56), "maxvit_grid": (56, 56),
    "nat": (56, 56), "dinat": (56, 56), "gna_flux": (256, 256), "na3d": (30, 48, 80),
    "timesformer_time": (8, 14, 14), "padding": (512,),
}


def test_examples_default_to_paper_sizes():
    sizes = {p.name: p.layout.sizes for _, p in all_patterns()}
    for name, want in PAPER_SIZES.items():
        assert sizes[name] == want, name


def test_swa_sees_the_last_w_tokens():
    m = attnlang.mask(ex("swa"), N=40, W=8)[0]
    assert all(m[q].sum() == min(q + 1, 8) and m[q, max(0, q - 7):q + 1].all() for q in range(40))


def test_streaming_sees_sinks_and_recent_window():
    m = attnlang.mask(ex("streaming"), N=64, sinks=4, recent=10)[0]
    q = 40
    assert np.flatnonzero(m[q]).tolist() == [0, 1, 2, 3] + list(range(31, 41))


def test_bigbird_blocks():
    B, N = 8, 128
    m = attnlang.mask(ex("bigbird"), N=N, B=B, r=2)[0]
    blocks = m.reshape(N // B, B, N // B, B)
    assert (blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all(), "BigBird is block-sparse"
    per_row = blocks.any(axis=(1, 3))
    for i in range(1, N // B - 1):
        # own + two neighbours + two global blocks + 2 random (which may coincide with those)
        assert per_row[i, [i - 1, i, i + 1, 0, N // B - 1]].all()
        assert 5 <= per_row[i].sum() <= 7
    assert per_row[0].all() and per_row[-1].all()  # global query blocks see everything


def test_prefix_lm():
    m = attnlang.mask(ex("prefix_lm"), N=16, P=5)[0]
    want = np.tril(np.ones((16, 16), bool))
    want[:5, :5] = True
    assert np.array_equal(m, want)


def test_swin_shifted_equals_cyclic_shift_with_region_mask():
    """Swin's own construction: roll the map by -s, partition into windows, mask across regions."""
    H, W, M, s = 8, 12, 4, 2
    m = attnlang.mask(ex("swin"), "swin_shifted", H=H, W=W, M=M)[0]
    region = np.zeros((H, W), int)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            region[hs, ws] = cnt
            cnt += 1
    want = np.zeros((H * W, H * W), bool)
    cells = [(i, j) for i in range(H) for j in range(W)]  # positions in the rolled map
    for a in cells:
        for b in cells:
            same_window = (a[0] // M, a[1] // M) == (b[0] // M, b[1] // M)
            if same_window and region[a] == region[b]:
                # rolled position (i, j) holds the original token ((i + s) % H, (j + s) % W)
                qa = ((a[0] + s) % H) * W + (a[1] + s) % W
                kb = ((b[0] + s) % H) * W + (b[1] + s) % W
                want[qa, kb] = True
    assert np.array_equal(m, want)


def test_maxvit_grid_groups_have_g_squared_members():
    m = attnlang.mask(ex("maxvit"), "maxvit_grid", H=12, W=12, G=3)[0]
    assert (m.sum(axis=1) == 9).all()
    assert m[0, 4 * 12 + 4] and not m[0, 1]  # stride H / G = 4


def test_halonet_query_block_sees_block_plus_halo():
    m = attnlang.mask(ex("halonet"), H=16, W=16, b=4, h=1)[0]
    q = 5 * 16 + 5  # block (1, 1): rows/cols 4..7, with halo 3..8
    rows, cols = np.divmod(np.flatnonzero(m[q]), 16)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 8, 3, 8)
    assert m[q].sum() == 36


def test_nat_sees_k_squared_keys_everywhere():
    m = attnlang.mask(ex("na2d"), "nat", H=10, W=12, K=3)[0]
    assert (m.sum(axis=1) == 9).all()


def test_dinat_dilation_groups():
    m = attnlang.mask(ex("dilated"), "dinat", H=12, W=12, K=3, d=4)[0]
    assert (m.sum(axis=1) == 9).all()
    q = 0
    rows, cols = np.divmod(np.flatnonzero(m[q]), 12)
    assert set(rows) == {0, 4, 8} and set(cols) == {0, 4, 8}


def test_na3d_causal_never_sees_future_frames():
    p = attnlang.resolve(ex("na3d_video"), "na3d_causal", T=4, H=6, W=7, K=(2, 3, 3))
    m = p.mask()[0]
    t = np.arange(p.n) // (6 * 7)
    assert not (m & (t[None, :] > t[:, None])).any()
    assert (m.sum(axis=1) <= 2 * 9).all()


def test_axial_and_timesformer():
    T, H, W = 3, 4, 5
    time_ = attnlang.mask(ex("axial_video"), "timesformer_time", T=T, H=H, W=W)[0]
    space = attnlang.mask(ex("axial_video"), "timesformer_space", T=T, H=H, W=W)[0]
    assert (time_.sum(axis=1) == T).all() and (space.sum(axis=1) == H * W).all()
    union = attnlang.mask(ex("axial_video"), "axial3", T=T, H=H, W=W)[0]
    assert (union.sum(axis=1) == T + H + W - 2).all()


def test_by_head_examples_differ_per_head():
    m = attnlang.mask(ex("duo_heads"), N=128, sinks=4, recent=16)
    assert m.shape[0] == 32
    assert np.array_equal(m[0], np.tril(np.ones((128, 128), bool)))
    assert m[8, 100].sum() == 4 + 16 and np.array_equal(m[8], m[31])
    st = attnlang.mask(ex("sparse_transformer"), N=64, l=8)
    assert st[0, 40].sum() == 8 and np.flatnonzero(st[4, 40]).tolist() == [0, 8, 16, 24, 32, 40]


def test_runtime_input_examples():
    doc = np.repeat([0, 1, 2], [5, 7, 4])
    m = attnlang.mask(ex("packed_docs"), N=16, inputs={"doc": doc})[0]
    want = (doc[:, None] == doc[None, :]) & np.tril(np.ones((16, 16), bool))
    assert np.array_equal(m, want)
    m = attnlang.mask(ex("padding"), N=16, inputs={"len": 10})[0]
    assert m[:10, :10].all() and not m[10:].any() and not m[:, 10:].any()


def test_show_dense_and_plan_paths_agree():
    """`attnlang show` classifies blocks pair by pair for small N and from a plan for large N."""
    from attnlang.commands.show import _plan_map, cell_map

    for path, name, kw in ((ex("bigbird"), None, {"N": 2048, "B": 64}),
                           (ex("na2d"), "nat", {"H": 40, "W": 48, "K": 7}),
                           (ex("streaming"), None, {"N": 3000, "recent": 300})):
        p = attnlang.resolve(path, name, **kw)
        for cell in (128, 512):
            assert np.array_equal(cell_map(p, 0, None, cell), _plan_map(p, 0, None, cell)), (p.name, cell)


def test_quickstart_runs():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "max |out - reference|" in res.stdout and "Traceback" not in res.stderr
    err = float(re.search(r"max \|out - reference\| = (\S+)", res.stdout).group(1))
    assert math.isfinite(err) and err < 1e-4


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    venv = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0"
    assert readme.index("```sh") < 40, "README must open with the commands"
    # The main job installs only what it needs (no Triton, no test tools); the tests, [dev].
    assert blocks[0].startswith(venv + " && pip install -e '.[torch]'") and "attnlang plan examples/" in blocks[0]
    assert "python examples/quickstart.py" in blocks[0]
    assert blocks[1] == venv + " && pip install -e '.[dev]' && pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and (ROOT / ".ci" / "run").stat().st_mode & 0o111
    steps = [line.strip() for line in ci.splitlines() if line.strip().startswith(("pip install", "pytest"))]
    assert steps == ["pip install torch==2.13.0", "pip install -e '.[dev]'", "pytest"]
