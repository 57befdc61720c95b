"""The `triton` backend: generated kernels, compiled once per pattern and cached on disk.

Static patterns: ``run(call)`` takes the call's plan (planned once per compiled pattern by
:class:`attnlang.api.Compiled`), generates the same standalone module ``attnlang compile``
writes, stores it under the cache directory keyed by a hash of its text (which holds the pattern
text, parameters, plan tables, target and attnlang version) and imports it. The module is also
remembered per plan object, so a repeated call neither re-plans nor re-hashes anything.

Runtime-input patterns (``same``/``valid``) and routed patterns (``route``): the kernels are
generated once per pattern and tiling with their tile tables as per-call arguments
(``per_call``); each call passes the exact tables of its per-batch-item plans
(:meth:`Call.plan`) with a batch dimension (and a query-head dimension for routed groups), so
full tiles stay full. The routing stage (pooled means, scores, selection) runs as hand-written
Triton kernels on the tensors' device (:mod:`attnlang.runtime.triton_routing`; the PBS
permutation and ``scope = head`` selection stay torch ops there); its decisions reach the kernels
as ``SEL`` (and ``POS`` for ``permute_keys``) tables that the compiled ``route`` predicate reads.
Selection is not differentiated. ``pyramid(...)`` patterns run on handwritten kernels instead
(:mod:`attnlang.runtime.triton_pyramid`: pooling, attention over the pooled keys, backward) for
``among = full``, ``causal`` or ``causal(axis)``; other ``among`` are refused (backend='torch').

Triton itself specialises and caches the compiled binaries per dtype and head dim.

Cache directory: ``$XDG_CACHE_HOME/attnlang/kernels``, else ``~/.cache/attnlang/kernels``. An
entry is ``NAME_DIGEST.py`` (and ``NAME_DIGEST.tables.bin`` for large tables), ``DIGEST`` being
the SHA-256 of its content; the module holds its tables' SHA-256. Nothing found there is trusted:
a file whose bytes differ from what its name stands for is rewritten (temp file + rename, tables
before module), the verified text is what gets executed and what Triton reads back, and an entry
that is still damaged after one rebuild is an AttnError naming the path.

>>> import attnlang, torch                                                 # doctest: +SKIP
>>> fn = attnlang.compile(attnlang.causal, tokens=4096, backend="triton")  # doctest: +SKIP
>>> fn(q.cuda(), k.cuda(), v.cuda())                                       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib.util
import linecache
import os
import pathlib
import sys
import tempfile
from types import ModuleType

import numpy as np
import torch

from attnlang.codegen.module import generate_module
from attnlang.codegen.module import module_name as _safe
from attnlang.codegen.triton import call_arrays
from attnlang.errors import AttnError
from attnlang.pattern import Pyramid
from attnlang.plan import Plan
from attnlang.runtime.call import Call
from attnlang.runtime.dispatch import exact_fallback
from attnlang.runtime.nonfinite import all_finite
from attnlang.version import __version__

_LOADED: dict[str, ModuleType] = {}  # plan_key -> imported module
# id(plan) -> (plan, target, module): the plan is kept so its id stays unique while cached
_BY_PLAN: dict[int, tuple[object, str, ModuleType]] = {}
_TEXT: dict[int, tuple[object, str]] = {}  # id(pattern) -> (pattern, its text and parameters)
_PER_CALL: dict[tuple, tuple[ModuleType, object]] = {}  # skeleton key -> (module, Kernels)
_MAX_CACHED = 256
INT32_OFFSETS = 2**31  # the kernels index rows of q/k/v with int32 token x head-dim offsets


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "attnlang" / "kernels"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(call: Call) -> str | None:
    try:
        import triton  # noqa: F401  (function-level: probes whether triton is installed)
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
    if d > 256 or call.v_dim > 256:
        return f"head dim {max(d, call.v_dim)} is over the kernels' limit of 256: use backend='torch'"
    n, width = call.q.shape[2], max(d, call.v_dim, 2)
    if (n + 256) * width >= INT32_OFFSETS:  # padded positions x head dim, and q + window < 2N
        return (f"N = {n} tokens x head dim {width} reaches the kernels' int32 element offsets "
                f"(2**31): use backend='torch'")
    if isinstance(call.pattern.attend, Pyramid):
        if call.v_dim != d:
            return (f"the pyramid(...) kernels need one head dim for q/k and v (got {d} and "
                    f"{call.v_dim}): use backend='torch'")
        # Imported only once the device is known to run kernels: its @triton.jit functions choose
        # compiled or interpreted (TRITON_INTERPRET) when the module is imported.
        from attnlang.runtime import triton_pyramid  # function-level: triton, see above

        return triton_pyramid.refusal(call)
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
    hit = _BY_PLAN.get(id(plan))
    if hit is not None and hit[0] is plan and hit[1] == target:
        return hit[2]
    key = plan_key(plan, target)
    if key not in _LOADED:
        _LOADED[key] = _import(plan, target, per_call=False)[0]
    if len(_BY_PLAN) >= _MAX_CACHED:
        _BY_PLAN.clear()
    _BY_PLAN[id(plan)] = (plan, target, _LOADED[key])
    return _LOADED[key]


def _pattern_text(pattern) -> str:
    hit = _TEXT.get(id(pattern))
    if hit is None or hit[0] is not pattern:
        if len(_TEXT) >= _MAX_CACHED:
            _TEXT.clear()
        hit = _TEXT[id(pattern)] = (pattern, pattern.to_attn() + "\0" + repr(pattern.params))
    return hit[1]


def per_call_module(plan, target: str):
    """The per-call-tables module for ``plan``'s tiling: ``(module, Kernels)``, generated and
    imported once per (pattern, tiling, target)."""
    groups = tuple((g.lo, g.hi) for g in plan.groups) if not plan.pattern.reads_content else ()
    key = (_pattern_text(plan.pattern), plan.block_m, plan.block_n, plan.order is None, plan.n_kernel,
           groups, target, __version__)
    if key not in _PER_CALL:
        _PER_CALL[key] = _import(plan, target, per_call=True)
    return _PER_CALL[key]


def _import(plan, target: str, per_call: bool):
    m = generate_module(plan, name=_safe(plan.pattern.name), target=target, per_call=per_call)
    source = m.source.encode()
    digest = hashlib.sha256(source + (m.sidecar or b"")).hexdigest()[:20]
    stem = f"{_safe(plan.pattern.name)}_{digest}"
    d = cache_dir()
    path = d / f"{stem}.py"
    # The tables first, the module last: the module is the entry's commit point, and it holds
    # the tables' SHA-256, so a module never runs with tables of another entry.
    files = {d / f"{stem}.tables.bin": m.sidecar} if m.sidecar is not None else {}
    files[path] = source
    problem = ""
    for attempt in range(2):  # a damaged entry is rebuilt once; then the error names the path
        try:
            _store(files, rebuild=attempt > 0)
        except OSError as e:
            raise AttnError(f"cannot write the kernel cache {d}: {e}",
                            hint="set XDG_CACHE_HOME to a writable directory") from None
        try:
            return _exec(f"attnlang_kernels.{stem}", path, files), m.kernels
        except _Damaged as e:
            problem = str(e)
    raise AttnError(f"kernel cache entry {path} is damaged and rebuilding it did not help: {problem}",
                    hint=f"delete {d} (or set XDG_CACHE_HOME to another directory) and run again")


class _Damaged(Exception):
    """A cache file whose bytes are not the ones the entry's name stands for."""


def _store(files: dict[pathlib.Path, bytes], rebuild: bool) -> None:
    """Write each file that is missing or differs from ``files`` (atomically: temp + rename)."""
    next(iter(files)).parent.mkdir(parents=True, exist_ok=True)
    for p, data in files.items():
        if rebuild or not _same_bytes(p, data):
            _atomic_write(p, data)


def _same_bytes(path: pathlib.Path, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    except FileNotFoundError:
        return False


def _exec(name: str, path: pathlib.Path, files: dict[pathlib.Path, bytes]) -> ModuleType:
    """Import the entry from the bytes on disk, once they are verified to be the expected ones.

    The verified text is what runs and what Triton reads back (``inspect.getsource`` goes
    through ``linecache``, which is seeded with it), so an edit made after the check is never
    compiled either.
    """
    for p, data in files.items():
        try:
            with open(p, "rb") as f:
                on_disk = f.read()
        except OSError as e:
            raise _Damaged(f"{p}: {e}") from None
        if hashlib.sha256(on_disk).digest() != hashlib.sha256(data).digest():
            raise _Damaged(f"{p} does not hold the content its name stands for (SHA-256 differs)")
    text = files[path].decode()
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
    sys.modules[name] = mod  # triton's JIT looks functions up through their module
    try:
        exec(compile(text, str(path), "exec"), mod.__dict__)
    except Exception as e:  # the generated text itself fails: not a cache problem, say so
        sys.modules.pop(name, None)
        raise AttnError(f"the generated module {path} fails to import: {type(e).__name__}: {e}",
                        hint="this is a bug in attnlang's code generator; please report it") from e
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


def per_call(call: Call) -> bool:
    """Whether the call's tables change per call (runtime inputs or Q/K routing)."""
    return bool(call.pattern.inputs) or call.pattern.reads_content


def item_plans(call: Call) -> list:
    """One plan per batch item, all at the first item's tiling.

    The planner may choose another token order for another item's inputs (its order search
    reads the tables); such an item is re-tabulated at the first item's tiling from its dense
    mask (O(N²), exact).
    """
    plans = [call.plan(b) for b in range(call.batch)]
    first = plans[0]
    for b, p in enumerate(plans[1:], 1):
        same = (p.block_m == first.block_m and p.block_n == first.block_n
                and [(g.lo, g.hi) for g in p.groups] == [(g.lo, g.hi) for g in first.groups]
                and ((p.order is None and first.order is None) or
                     (p.order is not None and first.order is not None and np.array_equal(p.order, first.order))))
        if not same:
            mask = call.pattern.mask(call.heads, inputs=call.item_inputs(b) if call.inputs else None,
                                     content=call.content(b) if call.pattern.reads_content else None)
            plans[b] = Plan.from_mask(call.pattern, mask, first.block_m, first.block_n, first.order,
                                      first.tile_q, first.tile_kv)
    return plans


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, H, N, Dv], lse [B, H, N] fp32 natural log)``, differentiable (lse too).

    NaN/Inf in q/k/v: the generated module launches its kernels' exact variant (``EXACT``), and
    ``pyramid(...)`` calls run on the torch executor's exact path, so no row sees a value its
    pattern hides (docs/reliability.md)."""
    why = supports(call)
    if why:
        raise AttnError(f"backend 'triton' cannot run this call: {why}")
    if isinstance(call.pattern.attend, Pyramid):  # pooled keys: their own kernels
        if not all_finite(call.q, call.k, call.v):
            # The pyramid kernels multiply masked entries by zero (0 * NaN = NaN in P @ V):
            # a hidden NaN would reach its tile. Rare: one check per call.
            return exact_fallback(call, "triton", "the pyramid(...) kernels would leak them into rows "
                                  "that may not see them (0 * NaN in P @ V)")
        from attnlang.runtime import triton_pyramid  # function-level: triton, as in supports()

        return triton_pyramid.run(call)
    target = target_for(call.q.device)
    if not per_call(call):
        mod = load_module(call.plan(0), target)
        return mod.attention(call.q, call.k, call.v, scale=call.scale, return_lse=True, **call.inputs)
    # Routing first, by the Triton routing kernels: the per-item plans read these decisions.
    contents = [call.content(b, kernels=True) for b in range(call.batch)] if call.pattern.reads_content else []
    plans = item_plans(call)
    mod, kernels = per_call_module(plans[0], target)
    arrays = call_arrays(kernels, plans, contents, call.heads)
    tables = {n: torch.from_numpy(a).to(call.q.device).contiguous() for n, a in arrays.items()}
    return mod.attention_tables(call.q, call.k, call.v, tables, scale=call.scale, return_lse=True,
                                **call.inputs)
