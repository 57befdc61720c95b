"""Context parallelism across real processes: torch.multiprocessing + gloo on CPU.

One spawn per world size (2, 3, 4) runs every case, because starting processes costs more than
the cases: each rank computes the single-process result on the full tensors itself and compares
its forward output, lse and the gradients of q, k, v (through ``shard``/``unshard``) with it.
Failures come back as text through files, so a broken case names itself.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TOL = dict(atol=2e-5, rtol=1e-4)


def _cases(world: int):
    """(name, spec kwargs, inputs factory, tensor shape) per case; small N, 16-token tiles."""
    import attnlang
    from attnlang import causal, neighborhood, sliding

    g = torch.Generator().manual_seed(7 + world)
    lengths = torch.randint(8, 90, (40,), generator=g).tolist()
    doc = torch.repeat_interleave(torch.arange(40), torch.tensor(lengths))[:336]
    doc = doc if len(doc) == 336 else torch.cat([doc, doc.new_full((336 - len(doc),), 99)])
    packed = "pattern p(N) { tokens n[N]\n input doc: ids[N]\n attend causal & same(doc) }"
    by_head = ("pattern bh(N) { tokens n[N]\n heads 2\n input len: length\n"
               " attend by head {\n 0..1: causal & sliding(24) & valid(len)\n 1..2: causal & valid(len)\n } }")
    moba = "pattern m(N = 384) { tokens n[N]\n attend moba(size = 48, top = 3) }"
    bigbird = "pattern bb(N = 320) { tokens n[N]\n attend bigbird(block = 16, r = 2, seed = 3) }"
    return [
        ("causal", dict(spec=causal, tokens=272), {}, (1, 2, 272, 8)),  # 17 tiles: uneven shards
        ("causal & sliding", dict(spec=causal & sliding(40), tokens=320), {}, (2, 2, 320, 8)),
        ("packed documents", dict(spec=packed, N=336), {"doc": doc}, (1, 2, 336, 8)),
        ("2-D neighborhood", dict(spec=neighborhood(window=(5, 7)), tokens=(12, 20)), {}, (1, 2, 240, 8)),
        ("bigbird", dict(spec=bigbird), {}, (1, 2, 320, 8)),
        ("gqa causal", dict(spec=causal & sliding(64), tokens=256), {}, (1, 4, 256, 8)),
        ("by head, padding", dict(spec=by_head, N=192), {"len": torch.tensor([150])}, (1, 2, 192, 8)),
        ("moba", dict(spec=moba), {}, (2, 2, 384, 8)),
    ]


def _run_case(name, kw, inputs, shape, rank, world):
    import attnlang
    from attnlang.distributed import ContextParallel
    from attnlang.runtime import chunks

    # The reference runs PyTorch's fused CPU kernel. Under ContextParallel BigBird runs the
    # explicit chunk math, the others the fused kernel (whose backward the lse term below routes
    # to the explicit path: the example checks the fused backward).
    chunks.USE_FUSED = True

    spec = kw.pop("spec")
    B, H, N, D = shape
    g = torch.Generator().manual_seed(11)
    hk = 2 if name.startswith("gqa") else H
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, hk, N, D, generator=g)
    v = torch.randn(B, hk, N, D, generator=g)
    dy = torch.randn(B, H, N, D, generator=g)
    dl = torch.randn(B, H, N, generator=g)
    # The single-process result.
    ref = attnlang.compile(spec, backend="torch", **kw)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = ref(qs, ks, vs, return_lse=True, **inputs)
    ((out * dy).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * dl).sum()).backward()
    # Context parallel.
    blocks = {} if name.startswith("gqa") else dict(block_m=16, block_n=16)  # gqa: the planner's tiles
    cp = ContextParallel(spec, **blocks, **kw)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    moved = []  # (sent, received) bytes of every all_to_all_single, as the collective sees them
    real = dist.all_to_all_single

    def counting(output, input, *a, **k):
        moved.append((input.numel() * input.element_size(), output.numel() * output.element_size()))
        return real(output, input, *a, **k)

    dist.all_to_all_single = counting
    chunks.USE_FUSED = name != "bigbird"
    try:
        ol, ll = cp(cp.shard(qd, **inputs), cp.shard(kd, **inputs), cp.shard(vd, **inputs), return_lse=True,
                    **inputs)
        y = cp.unshard(ol)
        lse_full = cp.unshard(ll)
        ((y * dy).sum() + (torch.where(torch.isinf(lse_full), 0.0, lse_full) * dl).sum()).backward()
    finally:
        dist.all_to_all_single = real
        chunks.USE_FUSED = True
    # Bytes counted from the sharding = bytes the collectives moved (forward K/V, backward dK/dV).
    sh = cp.routed_sharding if name == "moba" else cp.sharding(N, **inputs)
    m = sh.recv_tokens() * (B * hk * D * 2 * 4)
    assert moved == [(int(m[:, rank].sum()), int(m[rank].sum())), (int(m[rank].sum()), int(m[:, rank].sum()))], \
        f"{name}: moved {moved}, sharding says {m.tolist()}"
    torch.testing.assert_close(y, out.detach(), **TOL, msg=lambda m: f"{name}: output: {m}")
    torch.testing.assert_close(lse_full, lse.detach(), **TOL, msg=lambda m: f"{name}: lse: {m}")
    for what, a, b in (("dq", qd, qs), ("dk", kd, ks), ("dv", vd, vs)):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m, w=what: f"{name}: {w}: {m}")


def _errors(rank, world):
    """Bad input: wrong shard length on one rank, mismatched patterns, routed patterns."""
    from attnlang import AttnError, causal, sliding
    from attnlang.distributed import ContextParallel

    out = []
    cp = ContextParallel(causal, tokens=128, block_m=16, block_n=16)
    x = torch.randn(1, 1, 128, 4)
    xs = cp.shard(x)
    bad = xs[:, :, :-1] if rank == world - 1 else xs
    try:
        cp(bad, bad, bad)
        out.append("wrong length: no error")
    except AttnError as e:
        n = int(cp.sharding().local_sizes()[world - 1])
        want = f"q has {n - 1} tokens but this rank's shard holds {n}" if rank == world - 1 else \
            f"the call failed on rank {world - 1} (gave {n - 1} tokens, its shard holds {n})"
        if want not in str(e):
            out.append(f"wrong length: unclear message {e}")
    spec = causal & sliding(16 if rank == 0 else 32)
    cp2 = ContextParallel(spec, tokens=128, block_m=16, block_n=16)
    xs = cp2.shard(x)
    try:
        cp2(xs, xs, xs)
        out.append("mismatched patterns: no error")
    except AttnError as e:
        if "disagree" not in str(e):
            out.append(f"mismatched patterns: unclear message {e}")
    vmoba = "pattern m { tokens n[256]\n attend route(block = 32, top = 2, scope = head) }"
    try:
        ContextParallel(vmoba).shard(torch.randn(1, 1, 256, 4))
        out.append("routed scope = head: no error")
    except AttnError as e:
        if "scope = head" not in str(e):
            out.append(f"routed scope = head: unclear message {e}")
    try:  # Dv != D: the exchange packs K and V of one head dim (it used to fail inside it)
        cp(cp.shard(x), cp.shard(x), cp.shard(torch.randn(1, 1, 128, 2)))
        out.append("Dv != D: no error")
    except AttnError as e:
        if "one head dim for q, k and v, got 4, 4, 2" not in str(e):
            out.append(f"Dv != D: unclear message {e}")
    # After errors the group still works (no rank is left inside a collective).
    cp(cp.shard(x), cp.shard(x), cp.shard(x))
    return out


def _worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    problems = []
    try:
        # A timeout turns a desynchronised rank into an error instead of a hung test.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        for name, kw, inputs, shape in _cases(world):
            try:
                _run_case(name, dict(kw), inputs, shape, rank, world)
            except Exception:  # noqa: BLE001 - reported to the test with the traceback
                problems.append(f"[{name}] " + traceback.format_exc(limit=4))
        problems += _errors(rank, world)
        dist.barrier()
    except Exception:  # noqa: BLE001
        problems.append(traceback.format_exc())
    finally:
        with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(problems))
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_matches_single_process(world):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), d), nprocs=world, join=True,
                           start_method="spawn")
        report = []
        for r in range(world):
            text = open(os.path.join(d, f"rank{r}.txt")).read()
            if text:
                report.append(f"rank {r}:\n{text}")
    assert not report, "\n".join(report)


def test_example_runs_under_torchrun():
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                          "--master-port", str(_free_port()), str(root / "examples" / "context_parallel.py"),
                          "1024"], capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "largest difference to one process" in res.stdout and "4 ranks" in res.stdout
