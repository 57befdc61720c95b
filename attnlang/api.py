"""The public front door: parse, mask, plan and compile patterns.

A *spec* is any of: a :class:`~attnlang.pattern.Pattern`; a pattern expression built in Python
(``causal & sliding(256)``, then give ``tokens=`` or let a 1-D length bind at call time); a
``pathlib.Path``; a ``str`` naming an existing file or ending in ``.attn``; or any other ``str``,
taken as source text.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from attnlang import planner
from attnlang.errors import AttnError, did_you_mean
from attnlang.pattern import ByHead, Expr, Pattern, Same, Valid
from attnlang.plan import Plan
from attnlang.runtime import BACKENDS
from attnlang.simulate import Report, SweepPoint, simulate_pattern
from attnlang.targets import Target, load_target

if TYPE_CHECKING:  # pragma: no cover
    from attnlang.grammar import Module

MASK_LIMIT_BYTES = 1 << 30


def parse(spec: str | os.PathLike) -> "Module":
    """Parse ``.attn`` text or a file into a Module (patterns, constants, macros).

    >>> m = parse("pattern swa(N = 64) { tokens n[N]\\n attend causal & sliding(8) }")
    >>> m.names
    ['swa']
    """
    from attnlang.grammar import load, read_source  # function-level: lark (import attnlang builds no parser)

    if isinstance(spec, (str, os.PathLike)):
        text, name = read_source(spec)
        return load(text, name)
    raise AttnError(f"parse() takes .attn text or a path, got {type(spec).__name__}")


def resolve(spec: Any, pattern: str | None = None, *, n: int | None = None, tokens: Any = None,
            heads: int | None = None, **params: Any) -> Pattern:
    """Turn any spec into a bound :class:`Pattern` (``n`` binds a 1-D length left open)."""
    if isinstance(spec, Pattern):
        if params or tokens is not None or pattern is not None:
            raise AttnError("a Pattern is already bound: pass no pattern=, tokens= or parameters with it")
        return spec
    if isinstance(spec, (Expr, ByHead, Mapping)):
        if params or pattern is not None:
            raise AttnError(f"parameters {sorted(params)} only apply to .attn specs; "
                            "build the expression with the values instead")
        if tokens is None and n is None:
            raise AttnError("a pattern expression needs a token layout: pass tokens=N, "
                            "tokens=(T, H, W) or tokens={'t': T, 'h': H, 'w': W}")
        return Pattern.create(spec, tokens if tokens is not None else n, heads=heads,
                              inputs=_python_inputs(spec))
    if isinstance(spec, (str, os.PathLike)):
        if tokens is not None or heads is not None:
            raise AttnError("tokens= and heads= apply to Python-built patterns; in .attn files "
                            "set them with a `tokens` / `heads` line or pattern parameters")
        return parse(spec).instantiate(pattern, params, n=n)
    raise AttnError(f"cannot use a {type(spec).__name__} as a pattern spec",
                    hint="give a Pattern, a pattern expression, a path or .attn source text")


def mask(spec: Any, pattern: str | None = None, *, heads: int | None = None,
         inputs: Mapping[str, Any] | None = None, tokens: Any = None, **params: Any) -> np.ndarray:
    """The dense boolean mask ``[heads, N, N]`` of a pattern, for inspection and tests.

    >>> from attnlang import causal, sliding
    >>> mask(causal & sliding(1), tokens=3)[0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    p = resolve(spec, pattern, tokens=tokens, **params)
    h = heads or p.heads or 1
    size = h * p.n * p.n
    if size > MASK_LIMIT_BYTES:
        raise AttnError(f"the dense mask of '{p.name}' would take {size / 2**30:.1f} GiB "
                        f"({h} heads x {p.n} x {p.n}); mask() refuses more than 1 GiB",
                        hint="use attnlang.make_plan(...) for large sizes, or smaller parameters")
    return p.mask(heads=h, inputs=inputs)


def make_plan(spec: Any, pattern: str | None = None, *, inputs: Mapping[str, Any] | None = None,
              tokens: Any = None, block_m: int | None = None, block_n: int | None = None,
              order: str | None = None, content: Mapping[Any, np.ndarray] | None = None,
              **params: Any) -> "Plan":
    """Plan a pattern's tile schedule without evaluating the N x N mask.

    >>> from attnlang import causal, sliding
    >>> make_plan(causal & sliding(256), tokens=4096).stats()["tile_bound"] > 5
    True

    ``inputs`` are one batch item's runtime inputs; ``content`` the routing content of a
    pattern that reads Q/K (``attnlang.routing.pattern_content`` / ``attnlang.pyramid.pattern_content``).
    """
    p = resolve(spec, pattern, tokens=tokens, **params)
    np_inputs = None if inputs is None else {k: np.asarray(v) for k, v in inputs.items()}
    return planner.make_plan(p, inputs=np_inputs, block_m=block_m, block_n=block_n, order=order, content=content)


class Compiled:
    """A compiled pattern: call it like attention, ``fn(q, k, v, scale=None, return_lse=False, **inputs)``.

    Tensors are ``[B, H, N, D]``; K/V may have fewer heads (GQA) when ``H % Hkv == 0``, and V
    its own head dim ``Dv`` (MLA). Returns ``out [B, H, N, Dv]`` (and ``lse [B, H, N]`` in fp32
    with ``return_lse=True``). A row depends only on the keys and values its pattern allows it,
    even when others hold NaN/Inf.
    """

    def __init__(self, spec: Any, pattern: str | None, backend: str | None, tokens: Any,
                 heads: int | None, params: dict[str, Any]):
        self._spec, self._name, self._tokens, self._heads, self._params = spec, pattern, tokens, heads, params
        self.backend = backend
        self._patterns: dict[int | None, Pattern] = {}
        self._static = self._try_static()

    def _try_static(self) -> Pattern | None:
        """Bind now when possible; a 1-D length left open is bound from the tensors at call time."""
        spec = self._spec
        if isinstance(spec, (Expr, ByHead, Mapping)) and self._tokens is None:
            return None
        if isinstance(spec, (str, os.PathLike)):
            module = parse(spec)
            if module.needs_length(self._name, self._params):
                self._module = module
                return None
        return resolve(spec, self._name, tokens=self._tokens, heads=self._heads, **self._params)

    def pattern_for(self, n: int) -> Pattern:
        """The bound pattern for sequence length ``n``."""
        if self._static is not None:
            return self._static
        if n not in self._patterns:
            if isinstance(self._spec, (Expr, ByHead, Mapping)):
                self._patterns[n] = resolve(self._spec, n=n, heads=self._heads)
            else:
                self._patterns[n] = self._module.instantiate(self._name, self._params, n=n)
        return self._patterns[n]

    @property
    def pattern(self) -> Pattern:
        if self._static is None:
            raise AttnError("this pattern's length binds at call time; use pattern_for(n)")
        return self._static

    def plan(self, n: int | None = None, inputs: Mapping[str, Any] | None = None) -> "Plan":
        """The tile plan (for one batch item's ``inputs`` when the pattern reads any)."""
        p = self._static if n is None else self.pattern_for(n)
        if p is None:
            raise AttnError("this pattern's length binds at call time: pass n=")
        return planner.make_plan(p, inputs=None if inputs is None else {k: np.asarray(v) for k, v in inputs.items()})

    def __call__(self, q, k, v, scale: float | None = None, return_lse: bool = False, **inputs: Any):
        from attnlang.runtime.call import check_call  # function-level: torch (the runtime)
        from attnlang.runtime.dispatch import run  # function-level: torch (the runtime)

        n = q.shape[2] if hasattr(q, "shape") and len(q.shape) == 4 else None
        p = self._static if self._static is not None or n is None else self.pattern_for(n)
        if p is None:
            raise AttnError(f"q must be a tensor [B, H, N, D], got {type(q).__name__} "
                            f"{tuple(getattr(q, 'shape', ()))}")
        call = check_call(p, q, k, v, scale, inputs, self._cached_plan)
        call.want_lse = return_lse
        out, lse = run(call, self.backend)
        return (out, lse) if return_lse else out

    def _cached_plan(self, pattern: Pattern, inputs):
        """Plan once per bound pattern. Patterns reading runtime inputs plan per distinct input
        values (O(N + tiles) each), and keep the last ``INPUT_PLANS`` of them: the layers of a
        model call with the same document ids or lengths, and plan (and build schedules) once."""
        if inputs:
            return self._input_plan(pattern, inputs)
        cache = self.__dict__.setdefault("_plan_cache", {})
        if id(pattern) not in cache:  # bound patterns live in self._static / self._patterns
            cache[id(pattern)] = _planner(pattern, None)
        return cache[id(pattern)]

    def _input_plan(self, pattern: Pattern, inputs: Mapping[str, np.ndarray]):
        arrays = {k: np.ascontiguousarray(v) for k, v in sorted(inputs.items())}
        digest = hashlib.blake2b(digest_size=16)
        for k, v in arrays.items():
            digest.update(f"{k}:{v.dtype.str}:{v.shape};".encode())
            digest.update(v.tobytes())
        key = (id(pattern), digest.digest())
        lru: OrderedDict = self.__dict__.setdefault("_input_plans", OrderedDict())
        hit = lru.get(key)
        # Compare the values themselves: a hash match alone must never pick another plan.
        if hit is not None and hit[0].keys() == arrays.keys() and all(
                np.array_equal(hit[0][k], v) and hit[0][k].dtype == v.dtype for k, v in arrays.items()):
            lru.move_to_end(key)
            return hit[1]
        plan = _planner(pattern, arrays)
        lru[key] = ({k: v.copy() for k, v in arrays.items()}, plan)
        while len(lru) > INPUT_PLANS:
            lru.popitem(last=False)
        return plan

    def __repr__(self) -> str:
        p = self._static
        what = f"'{p.name}' tokens {p.layout.to_attn()}" if p else "(length bound at call time)"
        return f"<attnlang.Compiled {what} backend={self.backend or 'auto'}>"


def to_block_mask(spec: Any, pattern: str | None = None, *, B: int | None = None, H: int | None = None,
                  inputs: Mapping[str, Any] | None = None, tokens: Any = None, **params: Any):
    """A FlexAttention ``BlockMask`` for a pattern, planned without evaluating the N x N mask.

    >>> import attnlang
    >>> attnlang.to_block_mask(attnlang.causal & attnlang.sliding(256), tokens=4096).shape
    (1, 1, 4096, 4096)

    See :func:`attnlang.runtime.flex.to_block_mask` (``B``/``H`` sizes, runtime ``inputs``).
    """
    from attnlang.runtime.flex import to_block_mask as _to_block_mask  # function-level: torch (flex)

    return _to_block_mask(resolve(spec, pattern, tokens=tokens, **params), B=B, H=H, inputs=inputs)


def simulate(spec: Any, target: "str | Target" = "h100", pattern: str | None = None, *,
             dtype: str | None = None, head_dim: int = 128, batch: int = 1, heads: int | None = None,
             inputs: Mapping[str, Any] | None = None, tokens: Any = None,
             block_m: int | None = None, block_n: int | None = None,
             content: Mapping[Any, np.ndarray] | None = None, **params: Any) -> Report:
    """Predict the speedup of a pattern over dense attention on ``target``.

    ``spec`` is anything :func:`attnlang.make_plan` takes (a file, source text, a Pattern, an
    expression with ``tokens=``), a :class:`~attnlang.Compiled`, or a ready :class:`Plan`.
    ``dtype`` defaults to bf16 on GPUs and fp32 on the CPU; ``heads`` to the pattern's own
    ``heads`` line, else 8. ``**params`` override the pattern's parameters. Patterns that read
    Q/K (``route``, ``pyramid``) are planned for ``content`` (their routing decisions, see
    :func:`attnlang.make_plan`), by default for seeded Gaussian Q/K
    (:func:`attnlang.simulate.sample_content`). The model itself is
    :func:`attnlang.simulate.simulate_pattern` (a bound pattern or a plan).

    >>> simulate("pattern p { tokens n[4096]\\n attend full }", "a100").forward.schedule_bound
    1.0
    """
    tgt = load_target(target)
    if isinstance(spec, Plan):
        bound = spec
    elif isinstance(spec, Compiled):  # a compiled static pattern simulates the plan it runs
        bound = spec.pattern if spec.pattern.reads_content else spec.plan(inputs=inputs)
    else:
        bound = resolve(spec, pattern, tokens=tokens, **params)
    return simulate_pattern(bound, tgt, dtype=dtype, head_dim=head_dim, batch=batch, heads=heads, inputs=inputs,
                            block_m=block_m, block_n=block_n, content=content)


def sweep(spec: Any, name: str, values: Sequence[int], target: "str | Target" = "h100",
          pattern: str | None = None, *, progress: Callable[[Iterable], Iterable] | None = None,
          **kw: Any) -> list[SweepPoint]:
    """:func:`simulate` at each value of one pattern parameter (``name``), e.g. ``N`` from 1k to 1M.

    Allowed pairs come from the closed form where one exists (no counting per size).
    """
    tgt = load_target(target)
    sim_kw = {k: kw.pop(k) for k in ("dtype", "head_dim", "batch", "heads") if k in kw}
    out = []
    for v in (progress(values) if progress else values):
        r = simulate(spec, tgt, pattern, **sim_kw, **{**kw, name: v})
        out.append(SweepPoint(v, r.n, r.forward.flop_bound, r.forward.tile_bound, r.forward.schedule_bound,
                              r.forward.predicted, r.backward.predicted, r.forward.time_s))
    return out


INPUT_PLANS = 16  # plans kept per compiled pattern for distinct runtime-input values


def _planner(pattern: Pattern, inputs):
    return planner.make_plan(pattern, inputs=inputs)


def _python_inputs(spec: Any) -> dict[str, str]:
    """The runtime inputs a Python-built expression reads, declared with the kind its primitive
    needs (``same("doc")``: ids, ``valid("len")``: length): Python has no ``input`` lines."""
    if isinstance(spec, Mapping):
        exprs = list(spec.values())
    elif isinstance(spec, ByHead):
        exprs = [b.expr for b in spec.branches]
    else:
        exprs = [spec]
    out: dict[str, str] = {}
    for e in exprs:
        for node in (e.walk() if isinstance(e, Expr) else ()):
            if isinstance(node, (Same, Valid)):
                out.setdefault(node.input, "ids" if isinstance(node, Same) else "length")
    return out


def compile(spec: Any, pattern: str | None = None, backend: str | None = None, *, tokens: Any = None,
            heads: int | None = None, **params: Any) -> Compiled:
    """Compile a pattern into an attention callable.

    >>> import torch, attnlang
    >>> from attnlang import causal, sliding
    >>> fn = attnlang.compile(causal & sliding(4), tokens=32)
    >>> q = k = v = torch.randn(1, 2, 32, 16)
    >>> fn(q, k, v).shape
    torch.Size([1, 2, 32, 16])

    ``backend`` is ``None`` (the fastest that supports the call), ``"torch"``, ``"flex"``,
    ``"triton"`` or ``"reference"``; ``**params`` override the pattern's parameters.
    """
    if backend is not None and not isinstance(backend, str):
        raise AttnError(f"backend must be a name, got {backend!r}")
    if backend is not None and backend not in BACKENDS:
        raise AttnError(f"unknown backend '{backend}'{did_you_mean(backend, BACKENDS)}",
                        hint=f"valid backends: {', '.join(BACKENDS)}")
    return Compiled(spec, pattern, backend, tokens, heads, params)

