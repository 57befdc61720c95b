"""The torch executor's tile schedule: what it gathers, masks and skips."""
from __future__ import annotations

import numpy as np
import torch

import attnlang
from attnlang.pattern import Pattern, causal, sliding, strided
from attnlang.pattern import keys as keys_
from attnlang.plan import Plan
from attnlang.runtime import torch_exec
from attnlang.runtime.tiles import schedule_for


def oracle(p: Pattern, bm: int, bn: int, order=None) -> Plan:
    return Plan.from_mask(p, p.mask(), bm, bn, order)


def test_band_schedule_is_windowed_and_masks_only_partial_tiles():
    p = Pattern.create(causal & sliding(20), 128)
    plan = oracle(p, 16, 16)
    s = schedule_for(plan, 0, None, torch.device("cpu"))
    assert s.layout.window_start is not None and s.identity
    slots, bias_id = s.slots.numpy(), s.bias_id.numpy()
    assert np.array_equal(slots, s.layout.window_start[:, None] + np.arange(s.width))
    tm = plan.tile_map()
    for qt in range(plan.q_tiles):
        for j in range(s.width):
            kind = tm[qt, slots[qt, j]] if bias_id[qt, j] != 1 else 0
            assert (bias_id[qt, j] == 0) == (kind == 2)  # full tiles carry no mask
            assert (bias_id[qt, j] >= 2) == (kind == 1)
    # The partial masks are the IR's own `allowed` on the tiles' tokens.
    g = plan.groups[0]
    assert s.bias.shape[0] == 2 + g.partial.nnz
    dense = p.mask()[0]
    for j, (qt, kt) in enumerate(zip(np.repeat(np.arange(plan.q_tiles), g.partial.counts()), g.partial.indices)):
        want = dense[qt * 16:qt * 16 + 16, kt * 16:kt * 16 + 16]
        assert np.array_equal(s.bias[2 + j].numpy() == 0, want)


def test_scattered_schedule_and_padding_rows():
    p = Pattern.create(strided(7), 60)  # key tiles of a query tile are spread out
    order = np.concatenate([np.arange(60)[::-1], -np.ones(4, dtype=np.int64)])
    plan = oracle(p, 8, 8, order)
    s = schedule_for(plan, 0, None, torch.device("cpu"))
    assert not s.identity
    assert s.row_empty.numpy()[60:].all() and not s.row_empty.numpy()[:60].any()
    assert s.q_index.numpy()[60:].tolist() == [60] * 4  # padding reads the zero row
    assert np.array_equal(s.q_inverse.numpy(), 59 - np.arange(60))


def test_schedule_is_cached_per_plan():
    plan = oracle(Pattern.create(causal, 32), 8, 8)
    a = schedule_for(plan, 0, None, torch.device("cpu"))
    assert schedule_for(plan, 0, None, torch.device("cpu")) is a


def test_gradient_through_lse_only():
    fn = attnlang.compile(causal & sliding(5), tokens=40, backend="torch")
    ref = attnlang.compile(causal & sliding(5), tokens=40, backend="reference")
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    grads = [torch.autograd.grad(f(q, k, v, return_lse=True)[1].sum(), (q, k)) for f in (fn, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunks_bound_memory(monkeypatch):
    # Tiny chunks must give the same answer as one chunk: the executor never needs N x N.
    fn = attnlang.compile(causal & sliding(9) | attnlang.sink(2), tokens=96, backend="torch")
    q, k, v = (torch.randn(1, 2, 96, 8) for _ in range(3))
    whole = fn(q, k, v)
    monkeypatch.setattr(torch_exec, "CHUNK_BYTES", 1)
    torch.testing.assert_close(fn(q, k, v), whole, atol=1e-6, rtol=1e-6)


def test_uneven_rows_are_reordered_widest_first_and_stay_exact():
    """Global tokens make one query tile see every key tile: the schedule sorts query tiles by
    width so each chunk pads to its own widest row, and results still equal the reference."""
    from attnlang.pattern import global_

    torch_exec_chunk = torch_exec.CHUNK_BYTES
    p = Pattern.create((sliding(8) | global_(0, 4)) - keys_(range(40, 44)), 256)
    plan = attnlang.make_plan(p, block_m=16, block_n=16)
    s = schedule_for(plan, 0, None, torch.device("cpu"))
    assert s.layout.q_perm is not None and not s.q_identity
    assert list(s.layout.widths) == sorted(s.layout.widths, reverse=True)
    assert s.layout.chunk_width(s.q_tiles - 1, s.q_tiles) < s.width
    torch.manual_seed(0)
    q = torch.randn(2, 4, 256, 16, requires_grad=True)
    k = torch.randn(2, 2, 256, 16, requires_grad=True)
    v = torch.randn(2, 2, 256, 16, requires_grad=True)
    try:
        torch_exec.CHUNK_BYTES = 64 << 10  # many chunks of different widths
        outs = {}
        for backend in ("torch", "reference"):
            fn = attnlang.compile(p, backend=backend)
            o, lse = fn(q, k, v, return_lse=True)
            grads = torch.autograd.grad((o * o).sum() + lse.sum(), (q, k, v))
            outs[backend] = (o, lse, *grads)
    finally:
        torch_exec.CHUNK_BYTES = torch_exec_chunk
    for a, b in zip(outs["torch"], outs["reference"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
