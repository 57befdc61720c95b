"""Choosing a backend for a call, and running it."""
from __future__ import annotations

import torch

from attnlang.errors import AttnError, did_you_mean
from attnlang.runtime import BACKENDS, backend_module
from attnlang.runtime.call import Call


def choose(call: Call) -> str:
    """The default backend: the fastest one that supports the call on its device.

    CUDA tensors prefer generated Triton kernels; CPU tensors the plan-driven torch executor;
    the dense reference is the last resort (small sizes only).

    On CPU the order is fixed by measurement (``bench/cpu.py``, ``docs/benchmarks.md``): the
    torch executor runs forward *and* backward, needs no compilation (a first call costs
    planning only), and its forward is at least on par with compiled FlexAttention on the
    benchmarked patterns. ``flex`` is never the CPU default: it has no CPU backward and
    compiles for seconds per shape; ask for it with ``backend='flex'``.
    """
    prefs = ("triton", "torch", "flex", "reference") if call.q.is_cuda else ("torch", "flex", "reference")
    reasons = []
    for name in prefs:
        if name not in BACKENDS:
            continue
        why = backend_module(name).supports(call)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise AttnError("no backend can run this call:\n  " + "\n  ".join(reasons))


def run(call: Call, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    name = backend or choose(call)
    if name not in BACKENDS:
        raise AttnError(f"unknown backend '{name}'{did_you_mean(name, BACKENDS)}",
                        hint=f"valid backends: {', '.join(BACKENDS)}")
    mod = backend_module(name)
    why = mod.supports(call)
    if why is not None:
        raise AttnError(f"backend '{name}' cannot run this call: {why}")
    return mod.run(call)
