"""The speedup simulator: bounds on hand-computable cases, laws on random patterns, formats, errors."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

import attnlang
from attnlang.errors import AttnError
from attnlang.pattern import Pattern, and_, block, causal, full, sliding
from attnlang.plan import Plan
from attnlang import simulate
from attnlang.simulate import COMPONENTS, SCHEMA, parse_sweep, simulate_plan
from attnlang.targets import known_targets, load_target, target_from_dict
from strategies import exprs, patterns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ("h100", "h200", "b200", "a100", "cpu")


def oracle_plan(expr, n, bm=64, bn=64):
    p = Pattern.create(expr, n, name="p")
    return Plan.from_mask(p, p.mask(), bm, bn)


@pytest.mark.parametrize("target", TARGETS)
def test_dense_is_one(target):
    r = simulate(full, target, tokens=2048)
    for d in (r.forward, r.backward):
        assert d.flop_bound == d.tile_bound == 1.0
        assert d.schedule_bound == pytest.approx(1.0)
        assert d.predicted == pytest.approx(1.0)


def test_block_diagonal_tile_aligned_is_exact():
    r = simulate(oracle_plan(block(512), 4096, 128, 128), "h100", heads=4)
    assert r.flop_bound == r.tile_bound == 8.0
    assert r.tiles["partial"] == 0 and r.tiles["visited"] == 4 * 8 * 16
    assert 1 < r.schedule_bound <= 8.0


def test_causal_diagonal_correction():
    n, b = 4096, 128
    r = simulate(oracle_plan(causal, n, b, b), "a100")
    t = n // b
    assert r.flop_bound == pytest.approx(2 * n / (n + 1))  # N^2 / (N (N + 1) / 2)
    assert r.tile_bound == pytest.approx(2 * t / (t + 1))  # the diagonal tiles are visited whole
    assert r.tiles["partial"] == r.heads * t
    assert r.schedule_bound < r.tile_bound  # partial tiles pay the mask, rows are uneven


def test_torch_executor_pads_rows():
    # The CPU executor gives every query tile the widest row's slots: causal gains nothing there.
    r = simulate(oracle_plan(causal, 2048, 128, 128), "cpu")
    assert r.forward.breakdown_s["row padding"] > 0
    assert r.schedule_bound < 1.0 < r.tile_bound


def test_breakdown_sums_to_kernel_time():
    r = simulate(oracle_plan(causal & sliding(300), 2048), "h100", heads=16)
    for d in (r.forward, r.backward):
        assert set(d.breakdown_s) == set(COMPONENTS)
        assert sum(d.breakdown_s.values()) == pytest.approx(d.kernel_s)
        assert d.time_s == pytest.approx(d.kernel_s + sum(d.overheads_s.values()))
        assert d.overheads_s["index_tables"] > 0  # an oracle plan is tabulated
        assert d.time_s > 0 and d.dense_s > 0


def _padding(plan):
    return plan.q_tiles * plan.block_m * plan.kv_tiles * plan.block_n / plan.n ** 2


@settings(max_examples=30)
@given(patterns(max_n=256, max_leaves=4), st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]),
       st.sampled_from(TARGETS))
def test_bounds_are_ordered(p, bm, bn, target):
    plan = Plan.from_mask(p, p.mask(), bm, bn)
    r = simulate(plan, target, heads=3)
    for d in (r.forward, r.backward):
        assert d.predicted <= d.schedule_bound <= d.tile_bound
        if math.isfinite(d.flop_bound):
            assert d.tile_bound <= d.flop_bound * _padding(plan) * (1 + 1e-9)
        assert d.schedule_bound > 0


@settings(max_examples=30)
@given(st.data())
def test_sparser_never_lower_flop_bound(data):
    p = data.draw(patterns(max_n=200, max_leaves=3))
    extra = data.draw(exprs(p.layout, max_leaves=2))
    q = Pattern.create(and_(p.attend, extra), p.layout)
    ra = simulate(Plan.from_mask(p, p.mask(), 32, 32), "h100")
    rb = simulate(Plan.from_mask(q, q.mask(), 32, 32), "h100")
    assert rb.flop_bound >= ra.flop_bound


@settings(max_examples=25)
@given(patterns(max_n=200, max_leaves=4), st.sampled_from([16, 48]))
def test_pair_count_from_plan_equals_mask(p, b):
    # Without the plan's own count, the simulator counts pairs from full tiles + partial tiles.
    plan = dataclasses.replace(Plan.from_mask(p, p.mask(), b, b), allowed_pairs=None)
    assert simulate(plan, "h100", heads=1).allowed_pairs == int(p.mask()[0].sum())


def test_json_schema():
    r = simulate(causal & sliding(64), "h100", tokens=1024, heads=2)
    doc = json.loads(r.to_json())
    assert doc["schema"] == SCHEMA
    for key, typ in (("pattern", str), ("target", str), ("dtype", str), ("head_dim", int), ("batch", int),
                     ("heads", int), ("n", int), ("block_m", int), ("block_n", int), ("allowed_pairs", int),
                     ("density", float), ("tiles", dict), ("notes", list)):
        assert isinstance(doc[key], typ), key
    assert set(doc["tiles"]) == {"dense", "visited", "full", "partial"}
    for d in ("forward", "backward"):
        sec = doc[d]
        for key in ("flop_bound", "tile_bound", "schedule_bound", "predicted", "dense_s", "kernel_s", "time_s"):
            assert isinstance(sec[key], float), (d, key)
        assert set(sec["breakdown_s"]) == set(COMPONENTS)
        assert set(sec["overheads_s"]) == {"permute", "index_tables", "routing"}
        assert set(sec["gaps"]) == {"tile granularity", "schedule", "overheads"}
    assert doc["closed_form"]["pairs"] == "(2*N - r)*(r + 1)/2"
    empty = json.loads(simulate(attnlang.none, "h100", tokens=256).to_json())
    assert empty["forward"]["flop_bound"] is None  # infinite bounds are null


def test_text_and_markdown():
    r = simulate(causal & sliding(64), "b200", tokens=1024)
    text = str(r)
    assert "FLOP bound" in text and "schedule bound" in text and "closed form" in text
    md = r.to_markdown()
    assert md.startswith("### ") and "| FLOP bound |" in md


def test_targets_are_data():
    assert set(TARGETS) <= set(known_targets())
    for name in TARGETS:
        t = load_target(name)
        assert t.units >= 1 and t.forward.efficiency > 0
    assert load_target("h200").bandwidth_gbs > load_target("h100").bandwidth_gbs


def test_unknown_target_lists_known():
    with pytest.raises(AttnError) as e:
        simulate(full, "h10", tokens=256)
    msg = e.value.render()
    assert "unknown target 'h10'" in msg and "h100" in msg and "a100" in msg and "cpu" in msg


def test_profile_with_missing_fields(tmp_path):
    doc = json.loads(open(load_target("h100").path).read())
    del doc["units"], doc["forward"]["mask_cost"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AttnError) as e:
        load_target(str(path))
    assert "'units'" in str(e.value) and "'forward.mask_cost'" in str(e.value)
    with pytest.raises(AttnError, match="efficiency"):
        target_from_dict({**doc, "units": 1, "forward": {**doc["forward"], "mask_cost": 0, "efficiency": 2}})
    cpu = json.loads(open(load_target("cpu").path).read())
    with pytest.raises(AttnError) as e:
        target_from_dict({**cpu, "executor": {**cpu["executor"], "chunk_bytes": -1},
                          "backward": {**cpu["backward"], "gather_cost": "high"}})
    assert "chunk_bytes (a non-negative integer)" in str(e.value)
    assert "'backward.gather_cost' = 'high' must be a non-negative number" in str(e.value)


def test_user_profile_wins(tmp_path, monkeypatch):
    doc = json.loads(open(load_target("cpu").path).read())
    doc["description"] = "my calibrated machine"
    (tmp_path / "cpu.json").write_text(json.dumps(doc))
    monkeypatch.setenv("ATTNLANG_TARGETS", str(tmp_path))
    assert load_target("cpu").description == "my calibrated machine"


def test_bad_dtype_and_sizes():
    with pytest.raises(AttnError, match="fp8"):
        simulate(full, "a100", tokens=256, dtype="fp8")
    with pytest.raises(AttnError, match="heads"):
        simulate(full, "h100", tokens=256, heads=0)


def test_parse_sweep():
    assert parse_sweep("N=1k..8k") == ("N", [1024, 2048, 4096, 8192])
    assert parse_sweep("r=3..10") == ("r", [3, 6, 10])
    for bad, words in (("N=8k..1k", "empty"), ("N=abc..1k", "not a size"), ("N=0..16", "positive"),
                       ("N1k..2k", "NAME=LO..HI"), ("N=1k", "NAME=LO..HI")):
        with pytest.raises(AttnError, match=words):
            parse_sweep(bad)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "attnlang.cli", "simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def run_main(capsys, *args):
    from attnlang.cli import main

    rc = main(["simulate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_subprocess_json_sweep():
    r = cli(os.path.join("examples", "swa.attn"), "--set", "N=8192", "--json", "--sweep", "N=8k..32k")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "attnlang.sweep/1" and [p["value"] for p in doc["points"]] == [8192, 16384, 32768]
    assert doc["points"][-1]["flop_bound"] > doc["points"][0]["flop_bound"]
    assert doc["report"]["schema"] == SCHEMA


def test_cli_formats(tmp_path, capsys):
    swa = os.path.join(ROOT, "examples", "swa.attn")
    rc, out, err = run_main(capsys, swa, "--set", "N=16384", "--target", "h200")
    assert rc == 0, err
    assert "schedule bound" in out
    png = tmp_path / "swa.png"
    rc, out, err = run_main(capsys, swa, "--set", "N=1024", "--set", "W=128", "--sweep", "N=1k..4k", "--png", str(png))
    assert rc == 0, err
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    png2 = tmp_path / "tiles.png"  # large N: the tile map instead of the mask, bars instead of a sweep
    rc, out, err = run_main(capsys, swa, "--png", str(png2))
    assert rc == 0 and png2.stat().st_size > 1000
    rc, out, err = run_main(capsys, swa, "--md", "--target", "cpu", "--head-dim", "64")
    assert rc == 0 and "| FLOP bound |" in out


def test_cli_errors(capsys):
    swa = os.path.join(ROOT, "examples", "swa.attn")
    rc, out, err = run_main(capsys, swa, "--target", "h1000")
    assert rc == 1 and "known targets" in err and "Traceback" not in err
    rc, out, err = run_main(capsys, swa, "--sweep", "N=1M..1k")
    assert rc == 1 and "empty" in err
    rc, out, err = run_main(capsys, swa, "--sweep", "N=1k..x")
    assert rc == 1 and "not a size" in err


# --------------------------------------------------------------------------------------------
# Patterns that read Q/K: the routing overhead
# --------------------------------------------------------------------------------------------

def test_routing_overhead_for_route_and_pyramid():
    from attnlang.pattern import pyramid, route

    n, D, H = 1024, 64, 2
    r = simulate(Pattern.create(route(128, top=2, query_block=128), n, name="m"), "h100", head_dim=D, heads=H)
    assert r.forward.overheads_s["routing"] > 0 and r.backward.overheads_s["routing"] == 0
    assert any("seeded Gaussian" in note for note in r.notes)
    # The term is what its docstring says: pooling bytes + selection bytes + score FLOPs, per head.
    t = load_target("h100")
    G = nb = n // 128
    nbytes = 2 * n * D * 2 + 4 * G * nb * math.log2(nb)
    flops = 2 * G * nb * D
    want = H * (nbytes / (t.bandwidth_gbs * 1e9) + flops / (t.peak("bf16") * t.forward.efficiency))
    assert r.forward.overheads_s["routing"] == pytest.approx(want)
    assert r.forward.predicted < r.forward.schedule_bound
    # Static patterns pay none; a pyramid pays for its pooled key levels on top.
    assert simulate(causal, "h100", tokens=n).forward.overheads_s["routing"] == 0
    py = simulate(Pattern.create(pyramid(128, 128, keep=[0.25, 0.25, 0.25, 0.25]), n, name="p"), "cpu",
                  head_dim=D, heads=H)
    assert py.forward.overheads_s["routing"] > 0
    assert 0 < py.allowed_pairs <= H * n * n
    assert set(json.loads(r.to_json())["forward"]["overheads_s"]) == {"permute", "index_tables", "routing"}


def test_routed_pairs_match_the_mask_for_the_sampled_content():
    from attnlang.pattern import route
    from attnlang.simulate import sample_content

    p = Pattern.create(causal & route(64, top=2, query_block=64), 256, name="m")
    content = sample_content(p, heads=2, head_dim=16)
    r = simulate(p, "h100", heads=2, head_dim=16, content=content)
    assert r.allowed_pairs == int(p.mask(heads=2, content=content).sum())
    with pytest.raises(AttnError, match="routed for 1 head"):
        simulate_plan(attnlang.make_plan(p, content=sample_content(p, heads=1)), "h100", heads=2)


def test_calibration_fit_recovers_costs_and_refuses_nonsense():
    import numpy as np

    from attnlang.commands.calibrate import _check_fit, fit_costs

    # (calls, query tiles, slots, masked slots, gathered slots) of eight calibration patterns
    feats = np.array([[64, 512, 32768, 0, 0], [32, 512, 8192, 0, 0], [8, 512, 2048, 0, 0],
                      [2, 512, 512, 0, 0], [64, 512, 32768, 32768, 0], [24, 512, 5120, 5120, 0],
                      [24, 512, 5632, 5632, 5632], [8, 512, 2560, 512, 2560]], float)
    x = np.array([2e-4, 1.5e-5, 1e-5, 1.5e-6, 4e-6])
    times = feats @ x
    fit = fit_costs(feats, times)
    assert fit == pytest.approx(x, rel=1e-6)
    names = ["full", "b4", "b16", "b64", "causal", "window", "window_sink", "b16_sink"]
    _check_fit({"forward": fit}, {"forward": feats.tolist()}, {"forward": times.tolist()}, names)
    noisy = times.copy()
    noisy[1] *= 3  # a sparse pattern measured 3x slower: a busy machine
    bad = fit_costs(feats, noisy)
    with pytest.raises(AttnError, match="calibration failed.*miss b4"):
        _check_fit({"forward": bad, "backward": bad}, {"forward": feats.tolist(), "backward": feats.tolist()},
                   {"forward": noisy.tolist(), "backward": noisy.tolist()}, names)



@settings(max_examples=25, deadline=None)
@given(patterns(max_n=200, max_leaves=4), st.sampled_from([16, 32]), st.integers(1, 4),
       st.sampled_from([1 << 12, 1 << 14, 1 << 22]))
def test_cpu_model_walks_the_executors_chunks(p, tile, heads, chunk_bytes):
    """The CPU model's work items are the torch executor's fused calls, slot for slot: same
    chunks, same padding, bias exactly where the executor builds one, gathers exactly where it
    cannot read keys as a strided view."""
    import numpy as np
    import torch

    from attnlang.rows import chunks
    from attnlang.runtime.tiles import schedule_for
    from attnlang.simulate import pass_work

    plan = attnlang.make_plan(p, block_m=tile, block_n=tile)
    tgt = dataclasses.replace(load_target("cpu"), executor=dataclasses.replace(load_target("cpu").executor,
                                                                              chunk_bytes=chunk_bytes))
    (w,) = pass_work(plan, tgt, "forward", heads)
    want = []
    for gi, g in enumerate(plan.groups):
        hc = sum(plan.group_for_head(h) is g for h in range(heads))
        if not hc:
            continue
        s = schedule_for(plan, gi, None, torch.device("cpu"))
        for c0, c1 in chunks(s.layout, hc, tile, tile, chunk_bytes):
            W = s.layout.chunk_width(c0, c1)
            bid = s.bias_id[c0:c1, :W].numpy()
            want.append([hc * x for x in ((bid == 0).sum(), (bid >= 2).sum(), (bid == 1).sum(),
                                          bid.size if (bid > 0).any() else 0,
                                          bid.size if s.layout.window_step(c0, c1) is None else 0, c1 - c0)])
    got = np.stack([w.full, w.partial, w.padding, w.masked, w.gathered, w.qtiles], axis=1)
    assert got.tolist() == want


def test_pyramid_work_is_its_pooled_key_tiles():
    """A pyramid's kernels visit pooled keys: a key block kept at level l costs 1/l of its tiles.
    Blocks and query groups of one 64-token tile: every block at level 1 is every tile; at
    level 2 (keep = [0, 1] with levels [1, 2]) half of them."""
    from attnlang.pattern import pyramid

    n = 512
    whole = simulate(Pattern.create(pyramid(64, 64, levels=[1], keep=[1.0]), n, name="p"), "h100", heads=2)
    assert whole.tiles["visited"] == whole.tiles["dense"] == 2 * (n // 64) ** 2
    assert whole.forward.tile_bound == pytest.approx(1.0)
    half = simulate(Pattern.create(pyramid(64, 64, levels=[1, 2], keep=[0.0, 1.0]), n, name="p"), "h100", heads=2)
    assert half.tiles["visited"] == whole.tiles["visited"] // 2
    assert half.forward.tile_bound == pytest.approx(2.0) == half.forward.flop_bound
    assert half.forward.schedule_bound <= half.forward.tile_bound
    for target in ("h100", "cpu"):  # the same items on every target, forward and backward
        r = simulate(Pattern.create(pyramid(64, 64, levels=[1, 2], keep=[0.0, 1.0]), n, name="p"), target, heads=2)
        assert r.forward.kernel_s < r.forward.dense_s and r.backward.kernel_s < r.backward.dense_s


def test_cpu_gather_cost_scales_with_the_kv_working_set():
    """Gathered key tiles pay the calibrated gather cost in proportion to the K/V working set
    against the calibration's (cheaper while K and V sit in the cache), never more than whole."""
    from attnlang.pattern import sink
    from attnlang.simulate import _tile_seconds, pass_work

    base = load_target("cpu")
    tgt = dataclasses.replace(base, forward=dataclasses.replace(base.forward, gather_cost=1.0),
                              calibration={"n": 4096, "heads": 8, "head_dim": 64})
    for n, scale in ((1024, 0.25), (4096, 1.0), (8192, 1.0)):
        plan = attnlang.make_plan(Pattern.create(causal & (sliding(n // 8) | sink(64)), n))
        (w,) = pass_work(plan, tgt, "forward", 8)
        assert w.gathered.sum() > 0  # the sink tile makes rows that are not windows
        t, _ = _tile_seconds(tgt, tgt.forward, "fp32", 64, plan.block_m, plan.block_n)
        r = simulate_plan(plan, tgt, dtype="fp32", head_dim=64, heads=8)
        assert r.forward.breakdown_s["gather"] == pytest.approx(float(w.gathered.sum()) * t * scale)


@pytest.mark.parametrize("args, words", [
    (["--target", "h100"], ["cannot calibrate target 'h100'", "only 'cpu'"]),
    (["--n", "1000"], ["--n 1000 is too small", "2048 or more"]),
    (["--repeat", "0"], ["--repeat 0 must be a positive integer"]),
    (["--threads", "0"], ["--threads 0 must be a positive integer"]),
])
def test_calibrate_refuses_bad_arguments_before_measuring(capsys, args, words):
    from attnlang.cli import main

    rc = main(["calibrate", "-o", os.devnull, *args])
    err = capsys.readouterr().err
    assert rc != 0 and all(w in err for w in words), err
    assert "Traceback" not in err


def test_every_spec_kind_simulates_its_bound_pattern():
    """``attnlang.simulate`` resolves a spec (text, expression, Pattern, Compiled, Plan) in the
    api layer and hands the simulator a bound pattern or a plan: every kind gives one report."""
    from attnlang.simulate import simulate_pattern

    text = "pattern p(N = 1024) { tokens n[N]\n attend causal & sliding(100) }"
    p = attnlang.resolve(text)
    want = simulate_pattern(p, "h100", heads=2).to_json()
    specs = {"text": simulate(text, "h100", heads=2), "pattern": simulate(p, "h100", heads=2),
             "expr": simulate(causal & sliding(100), "h100", tokens=1024, heads=2),
             "compiled": simulate(attnlang.compile(text), "h100", heads=2),
             "plan": simulate(attnlang.make_plan(p), "h100", heads=2)}
    for kind, r in specs.items():
        got, exp = json.loads(r.to_json()), json.loads(want)
        got.pop("pattern"), exp.pop("pattern")  # the expression's pattern has no name
        assert got == exp, kind
    # Parameters are the .attn file's: N=2048 plans twice the tokens.
    assert simulate(text, "h100", N=2048).n == 2048
