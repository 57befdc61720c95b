"""The `triton` backend: generated kernels, compiled once per pattern and cached on disk.

``run(call)`` plans the pattern (the planner's plan; for patterns with runtime inputs the static
envelope of :func:`attnlang.codegen.module.module_plan`), generates the same standalone module
``attnlang compile`` writes, stores it under the cache directory keyed by a hash of its text
(which holds the pattern text, parameters, plan tables, target and attnlang version) and imports
it. Triton itself specialises and caches the compiled binaries per dtype and head dim.

Cache directory: ``$XDG_CACHE_HOME/attnlang/kernels``, else ``~/.cache/attnlang/kernels``.

>>> import attnlang, torch                                                 # doctest: +SKIP
>>> fn = attnlang.compile(attnlang.causal, tokens=4096, backend="triton")  # doctest: +SKIP
>>> fn(q.cuda(), k.cuda(), v.cuda())                                       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile
from types import ModuleType

import numpy as np
import torch

from attnlang.errors import AttnError
from attnlang.runtime.call import Call

_LOADED: dict[str, ModuleType] = {}  # plan_key -> imported module


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "attnlang" / "kernels"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(call: Call) -> str | None:
    from attnlang.pattern import Pyramid

    if isinstance(call.pattern.attend, Pyramid) or call.pattern.reads_content:
        return "route/pyramid run on the torch backend for now: use backend='torch'"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    on_cpu_interp = call.q.device.type == "cpu" and _interpreting()
    if on_cpu_interp and call.q.dtype == torch.bfloat16:
        return ("the Triton interpreter computes bfloat16 wrongly; use float16/float32 on CPU, "
                "or backend='torch'")
    if not (call.q.is_cuda or on_cpu_interp):
        return (f"needs CUDA tensors (got {call.q.device.type}); on CPU it runs only under "
                "TRITON_INTERPRET=1 (slow, for tests): use backend='torch' there")
    d = call.q.shape[-1]
    if d > 256:
        return f"head dim {d} is over the kernels' limit of 256: use backend='torch'"
    return None


def target_for(device: torch.device) -> str:
    """The autotune target for a device (``cpu`` under the interpreter)."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "b200"
    if major == 9:
        return "h100"
    return "a100"


def plan_key(plan, target: str) -> str:
    """A digest of what the generated module depends on: pattern text, parameters, tiling,
    order, every table and the target (cheaper than generating the source to hash it)."""
    from attnlang import __version__

    h = hashlib.sha256()
    for part in (__version__, target, plan.pattern.to_attn(), repr(plan.pattern.params),
                 repr((plan.block_m, plan.block_n, plan.tile_q, plan.tile_kv))):
        h.update(part.encode() + b"\0")
    h.update(b"natural" if plan.order is None else np.asarray(plan.order, dtype=np.int64).tobytes())
    for g in plan.groups:
        h.update(repr((g.lo, g.hi, g.closed_form is not None)).encode())  # its text follows the tiling
        for t in (g.partial, g.full):
            h.update(np.asarray(t.indptr, dtype=np.int64).tobytes() + np.asarray(t.indices, dtype=np.int32).tobytes())
    return h.hexdigest()


def load_module(plan, target: str) -> ModuleType:
    """Generate, cache on disk and import the module for ``plan`` (once per process and key)."""
    from attnlang.codegen.module import generate_module, module_name as _safe

    key = plan_key(plan, target)
    if key in _LOADED:
        return _LOADED[key]
    m = generate_module(plan, name=_safe(plan.pattern.name), target=target)
    digest = hashlib.sha256(m.source.encode() + (m.sidecar or b"")).hexdigest()[:20]
    stem = f"{_safe(plan.pattern.name)}_{digest}"
    d = cache_dir()
    path = d / f"{stem}.py"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if m.sidecar is not None and not (d / f"{stem}.tables.bin").exists():
            _atomic_write(d / f"{stem}.tables.bin", m.sidecar)
        if not path.exists():
            _atomic_write(path, m.source.encode())
    except OSError as e:
        raise AttnError(f"cannot write the kernel cache {d}: {e}",
                        hint="set XDG_CACHE_HOME to a writable directory") from None
    name = f"attnlang_kernels.{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton's JIT looks functions up through their module
    spec.loader.exec_module(mod)
    _LOADED[key] = mod
    return mod


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan_for(call: Call):
    """The plan the kernels run for this call (static: shared by every batch item)."""
    from attnlang.codegen.module import module_plan

    if not call.pattern.inputs:
        return call.plan(0)
    return module_plan(call.pattern, lambda p: call.planner(p, None))


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, H, N, D], lse [B, H, N] fp32 natural log)``, differentiable."""
    why = supports(call)
    if why:
        raise AttnError(f"backend 'triton' cannot run this call: {why}")
    mod = load_module(plan_for(call), target_for(call.q.device))
    return mod.attention(call.q, call.k, call.v, scale=call.scale, return_lse=True, **call.inputs)
