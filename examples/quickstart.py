"""attnlang in one page: write a pattern, look at its plan, run it on CPU, check it.

    python examples/quickstart.py

1. compile a pattern (Python builders here; an .attn file works the same way),
2. print its tile plan (which key tiles each query tile visits; no N x N work),
3. print the simulator's speedup bounds on an H100, when the simulator is installed,
4. run it on CPU tensors and compare against the dense reference backend.
"""
from __future__ import annotations

import pathlib
import time

import torch

import attnlang
from attnlang import causal, sink, window

N, HEADS, DIM = 2048, 4, 64
HERE = pathlib.Path(__file__).parent


def main() -> None:
    # StreamingLLM-style: 4 sink tokens + the 256 most recent tokens, causal.
    pattern = causal & (sink(4) | window(before=255, after=0))
    fn = attnlang.compile(pattern, tokens=N)
    print(f"pattern: {pattern}\n")

    plan = fn.plan()
    print(plan, "\n")

    # What sparsity can buy on an H100, and on this CPU's torch executor (packaged profile).
    print(attnlang.simulate(fn, target="h100", heads=HEADS), "\n")
    print(attnlang.simulate(fn, target="cpu", heads=HEADS, head_dim=DIM), "\n")

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, DIM) for _ in range(3))
    t0 = time.perf_counter()
    out = fn(q, k, v)
    t1 = time.perf_counter()
    ref = attnlang.compile(pattern, tokens=N, backend="reference")(q, k, v)
    err = (out - ref).abs().max().item()
    print(f"backend {fn.backend or 'auto'}: out {tuple(out.shape)} in {1e3 * (t1 - t0):.1f} ms, "
          f"max |out - reference| = {err:.2e}")
    assert err < 1e-4, "the compiled pattern disagrees with the dense reference"

    # The same in the language: a file from examples/, a parameter overridden at compile time.
    swa = attnlang.compile(HERE / "swa.attn", N=N, W=512)
    out = swa(q, k, v)
    print(f"examples/swa.attn with N={N}, W=512: out {tuple(out.shape)}, "
          f"tile bound {swa.plan().stats()['tile_bound']:.1f}x")


if __name__ == "__main__":
    main()
