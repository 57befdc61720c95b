"""Context parallelism on CPU: one attention call spread over 4 processes (gloo).

    torchrun --nproc-per-node 4 examples/context_parallel.py [N]

Every rank builds the same full Q/K/V (same seed; in a model they come from the sharded
activations of the layer before), keeps its part with ``cp.shard``, runs attention on it with
``cp(...)``, and gathers the output with ``cp.unshard``. The sharding gives each rank equal
work and moves only the K/V tiles a rank reads. Rank 0 checks the result and the gradients
against one process running the whole sequence, and prints what moved.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import attnlang
from attnlang import causal, sliding
from attnlang.distributed import ContextParallel

N = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
HEADS, DIM = 4, 64


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, DIM, requires_grad=True) for _ in range(3))

    pattern = causal & sliding(N // 8)  # Mistral-style sliding window
    cp = ContextParallel(pattern, tokens=N)
    out = cp.unshard(cp(cp.shard(q), cp.shard(k), cp.shard(v)))
    out.square().mean().backward()  # every rank computes the same loss on the full output

    sh = cp.sharding()
    if rank == 0:
        print(f"{world} ranks: {sh.describe()}")
        print(f"tokens per rank {sh.local_sizes().tolist()}; K/V tokens received per rank "
              f"{sh.recv_tokens().sum(axis=1).tolist()} (a K/V all-gather: {N - sh.local_sizes().min()})")
        q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref = attnlang.compile(pattern, tokens=N)(q1, k1, v1)
        ref.square().mean().backward()
        err = max((out - ref).abs().max().item(), (q.grad - q1.grad).abs().max().item(),
                  (k.grad - k1.grad).abs().max().item(), (v.grad - v1.grad).abs().max().item())
        print(f"largest difference to one process (output and gradients): {err:.2e}")
        assert err < 1e-4
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:  # plain `python`: one rank (torchrun sets these for every rank)
        print("not under torchrun: running on 1 rank (try torchrun --nproc-per-node 4 ...)")
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    main()
