"""Choosing a backend for a call, and running it; the torch executor as every backend's exact
fallback for non-finite inputs."""
from __future__ import annotations

import warnings

import torch

from attnlang.errors import AttnError, did_you_mean
from attnlang.runtime import BACKENDS, backend_module
from attnlang.runtime import torch_exec
from attnlang.runtime.call import Call

_WARNED: set[str] = set()  # backends whose non-finite fallback has warned


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


def exact_fallback(call, backend: str, why: str):
    """Run ``call`` on the torch executor, whose chunks switch to masked products when an input
    is non-finite: for backends whose own kernels multiply masked entries by zero. Warns once
    per backend."""
    if backend not in _WARNED:
        _WARNED.add(backend)
        warnings.warn(f"attnlang: q/k/v hold NaN or Inf; {why}, so backend='{backend}' runs such "
                      "calls on the torch executor's exact path", stacklevel=4)
    return torch_exec.run(call)
