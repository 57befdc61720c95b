"""Properties of ``attnlang.distributed.shard``: pure numpy, no processes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlang import AttnError, Pattern, causal, make_plan, neighborhood, sliding
from attnlang.distributed import shard
from attnlang.planner import make_plan as plan_pattern
from strategies import patterns

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _needed(plan, sh, rank) -> set[int]:
    """Key tiles the rank's query tiles visit, from the plan's tile maps (the independent view)."""
    mine = sh.q_tiles_of(rank)
    mine = mine[mine < plan.q_tiles]
    need = set()
    for g in plan.groups:
        m = plan.tile_map(g.lo)
        need |= set(np.nonzero(m[mine].any(axis=0))[0].tolist())
    return need


def check_sharding(plan, world):
    sh = shard(plan, world)
    # Every query tile exactly once, every token exactly once.
    tiles = np.concatenate([sh.q_tiles_of(r) for r in range(world)])
    assert np.array_equal(np.sort(tiles), np.arange(sh.q_tiles))
    toks = np.concatenate([sh.tokens(r) for r in range(world)])
    assert np.array_equal(np.sort(toks), np.arange(plan.n))
    assert sh.local_sizes().sum() == plan.n
    kv_owner = sh.kv_owner()
    for r in range(world):
        got = [t for s in range(world) for t in sh.recv[r][s].tolist()]
        # Received exactly once, only what it needs, from the tile's owner, never from itself.
        assert len(got) == len(set(got))
        assert sh.recv[r][r].size == 0
        for s in range(world):
            assert (kv_owner[sh.recv[r][s]] == s).all()
        need = _needed(plan, sh, r)
        own = set(np.nonzero(kv_owner == r)[0].tolist())
        assert set(got) == need - own
    return sh


@SETTINGS
@given(patterns(max_n=384, max_leaves=4), st.integers(1, 5), st.sampled_from([16, 32]))
def test_shard_covers_tiles_and_receives_each_needed_tile_once(p, world, block):
    plan = plan_pattern(p, block_m=block, block_n=block)
    units = -(-plan.n_kernel // block)
    if world > units:
        with pytest.raises(AttnError, match="exceeds"):
            shard(plan, world)
        return
    check_sharding(plan, world)


@SETTINGS
@given(st.integers(64, 600), st.integers(2, 5), st.sampled_from([(16, 32), (32, 16), (16, 16)]))
def test_shard_unequal_tiles_and_uneven_world(n, world, blocks):
    """Query and key tiles of different sizes; sizes no world size divides."""
    plan = make_plan(causal & sliding(50), tokens=n, block_m=blocks[0], block_n=blocks[1])
    if world > -(-n // max(blocks)):
        return
    check_sharding(plan, world)


def test_packed_documents_per_batch_item():
    rng = np.random.default_rng(0)
    p = Pattern.create(causal & __import__("attnlang").same("doc"), tokens=2048, inputs={"doc": "ids"})
    plans = []
    for _ in range(2):
        doc = np.repeat(np.arange(50), rng.integers(10, 120, 50))[:2048]
        plans.append(plan_pattern(p, inputs={"doc": doc}, block_m=64, block_n=64))
    sh = shard(plans, 4)
    assert sh.imbalance <= 1.05


@pytest.mark.parametrize("expr,tokens", [
    (causal, 16384), (causal & sliding(1024), 16384),
    (neighborhood(window=(13, 13)), (128, 128)),
])
def test_balance(expr, tokens):
    sh = shard(make_plan(expr, tokens=tokens), 4)
    assert sh.imbalance <= 1.05, sh.describe()


def test_zigzag_falls_out_for_causal_and_bands_stay_contiguous():
    causal_plan = make_plan(causal, tokens=8192)
    z = shard(causal_plan, 4)
    assert z.segments_per_rank == 2
    assert z.owner[0] == z.owner[-1] == 0  # rank 0 holds the head and the tail
    band = shard(make_plan(causal & sliding(512), tokens=8192), 4)
    assert band.segments_per_rank == 1
    # A band receives only the halo: one window's worth of tokens per rank at most.
    assert band.recv_tokens().sum(axis=1).max() <= 512 + 64
    # Dense causal moves no more per rank than ring attention (each rank gets all other K/V).
    b = z.bytes_moved(1)
    assert (b["forward"] <= b["all_gather"]).all() and b["forward"].max() <= b["all_gather"].max()


def test_routed_shards_whole_blocks():
    from attnlang import parse
    from attnlang.simulate import sample_content, simulate_ranks

    moba = parse("pattern m { tokens n[4096]\n attend moba(size = 256, top = 3) }").instantiate("m", {})
    content = sample_content(moba, 1, 16)
    plan = plan_pattern(moba, content=content)
    sh = shard(plan, 3, unit=256, routed=True)
    assert sh.unit == 256 and sh.local_sizes().sum() == 4096
    r = simulate_ranks(plan, 3, "h100", heads=1, content=content)
    assert r.ranks == 3 and "512" not in r.layout and "units of 256" in r.layout


def test_routed_and_too_many_ranks_are_refused():
    from attnlang import parse

    moba = parse("pattern m { tokens n[512]\n attend moba(size = 64, top = 2) }").instantiate("m", {})
    from attnlang.simulate import sample_content

    plan = plan_pattern(moba, content=sample_content(moba, 1, 16))
    with pytest.raises(AttnError, match="reads Q/K"):
        shard(plan, 2)
    with pytest.raises(AttnError, match="exceeds the 4 units"):
        shard(make_plan(causal, tokens=256, block_m=64, block_n=64), 5)


def test_import_needs_no_torch():
    code = "import sys, attnlang.distributed as d; d.shard; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_simulate_ranks_report():
    from attnlang.simulate import simulate_ranks

    r = simulate_ranks(make_plan(causal & sliding(512), tokens=8192), 4, "h100", head_dim=64, heads=4)
    assert r.ranks == 4 and abs(sum(r.work) - 1) < 1e-9 and r.imbalance <= 1.05
    # A band receives one halo of K/V (bf16) per rank: 512 + a tile of tokens, 4 heads x 64 x 2 x 2 B.
    assert max(r.forward_bytes) <= (512 + 64) * 4 * 64 * 2 * 2
    assert max(r.backward_bytes) == 2 * max(r.forward_bytes)  # partial sums come back in fp32
    assert r.interconnect_gbs == 450.0 and 0 < r.forward_s < r.single_forward_s
    assert "imbalance" in str(r) and r.to_dict()["ranks"] == 4


def test_cli_simulate_ranks():
    import json

    base = [sys.executable, "-m", "attnlang.cli", "simulate", "examples/swa.attn", "--set", "N=16384"]
    out = subprocess.run(base + ["--ranks", "4"], capture_output=True, text=True, check=True).stdout
    assert "context parallel over 4 ranks" in out and "predicted step at 450 GB/s" in out
    doc = json.loads(subprocess.run(base + ["--ranks", "3", "--json"], capture_output=True, text=True,
                                    check=True).stdout)
    assert doc["ranks"]["ranks"] == 3 and len(doc["ranks"]["forward_bytes"]) == 3
    bad = subprocess.run(base + ["--ranks", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--ranks 0 must be a positive integer" in bad.stderr + bad.stdout


def test_simulate_ranks_falls_back_to_packaged_interconnect(tmp_path):
    import json

    from attnlang.simulate import simulate_ranks
    from attnlang.targets import PACKAGED, load_target

    doc = json.loads((PACKAGED / "cpu.json").read_text())
    del doc["interconnect_gbs"]  # as `attnlang calibrate` writes it
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    assert load_target(str(path)).interconnect_gbs is None
    r = simulate_ranks(make_plan(causal & sliding(256), tokens=4096), 2, str(path), head_dim=64)
    assert r.interconnect_gbs == 0.5
