"""One attention call, normalised at the boundary: checked tensors, scale, runtime inputs, plans.

Every backend receives a :class:`Call` and may assume canonical forms: ``q``/``k [B, Hq or
Hkv, N, D]``, ``v [B, Hkv, N, Dv]`` (``Dv`` may differ from ``D``: MLA-style value heads) with
``Hq >= 1`` and ``Hq % Hkv == 0``, one floating dtype and one device, a float
``scale``, runtime inputs as int64 tensors (``ids [B, N]``, ``length [B]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from attnlang.errors import AttnError
from attnlang.inputs import by_keyword, check_inputs
from attnlang.pattern import Pattern, Pyramid
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.runtime import routing

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Call:
    """A checked call: the pattern, tensors, scale, inputs, and a per-batch-item plan cache."""

    pattern: Pattern
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    inputs: dict[str, torch.Tensor]
    planner: Callable[[Pattern, Mapping[str, np.ndarray] | None], Plan]
    _plans: dict[int, Plan] = field(default_factory=dict)
    want_lse: bool = True  # False: the caller drops lse, so a backend may return None for it
    _content: dict[int, dict] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def v_dim(self) -> int:
        """The value head dim ``Dv`` (the output's last dim); may differ from q/k's ``D``."""
        return self.v.shape[3]

    def item_inputs(self, b: int) -> dict[str, np.ndarray]:
        """Batch item ``b``'s runtime inputs as numpy (what the IR and planner read)."""
        return {name: t[b].detach().cpu().numpy() for name, t in self.inputs.items()}

    def content(self, b: int = 0, kernels: bool = False) -> dict:
        """Batch item ``b``'s routing decisions (``route``), computed once per call on first use
        by the torch routing stage (by its Triton kernels with ``kernels``, as the triton backend
        asks); ``{}`` for patterns that do not read Q/K."""
        if b not in self._content:
            if kernels:
                from attnlang.runtime import triton_routing  # function-level: triton, loaded only here

                pattern_content = triton_routing.pattern_content
            else:
                pattern_content = routing.pattern_content
            self._content[b] = pattern_content(self.pattern, self.q[b].detach(), self.k[b].detach(), self.scale)
        return self._content[b]

    def plan(self, b: int = 0) -> Plan:
        """The plan for batch item ``b`` (one shared plan when the pattern reads no inputs)."""
        if self.pattern.reads_content and not isinstance(self.pattern.attend, Pyramid):
            if b not in self._plans:  # routed: per batch item and head, from this call's Q/K
                self._plans[b] = make_plan(self.pattern, inputs=self.item_inputs(b) if self.inputs else None,
                                           content=self.content(b))
            return self._plans[b]
        key = b if self.inputs else 0
        if key not in self._plans:
            self._plans[key] = self.planner(self.pattern, self.item_inputs(b) if self.inputs else None)
        return self._plans[key]


def check_call(pattern: Pattern, q: Any, k: Any, v: Any, scale: Any,
               inputs: Mapping[str, Any], planner: Callable) -> Call:
    """Validate and normalise one call; raise AttnError naming every problem found."""
    problems: list[str] = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttnError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            problems.append(f"{name} must have 4 dimensions [B, H, N, D], got shape {tuple(t.shape)}")
    if problems:
        raise AttnError("\n".join(problems))
    if not (q.dtype == k.dtype == v.dtype):
        problems.append(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    elif q.dtype not in DTYPES:
        problems.append(f"dtype {q.dtype} is not supported; use float32, float16 or bfloat16")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, N, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        problems.append(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        problems.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, H, N]")
    if k.shape[3] != D:
        problems.append(f"q head dim {D} and k head dim {k.shape[3]} differ")
    if N != pattern.n or k.shape[2] != pattern.n:
        problems.append(
            f"sequence length N = {N} (q) / {k.shape[2]} (k) does not match the pattern "
            f"'{pattern.name}' with tokens {pattern.layout.to_attn()} (N = {pattern.n})")
    Hkv = k.shape[1]
    if Hq == 0 or Hkv == 0:
        problems.append(f"attention needs at least one head: q has {Hq} heads, k/v have {Hkv} "
                        f"(shapes q {tuple(q.shape)}, k {tuple(k.shape)})")
    elif Hq % Hkv:
        problems.append(f"{Hq} query heads are not a multiple of {Hkv} key/value heads (GQA needs Hq % Hkv == 0)")
    if pattern.heads is not None and Hq != pattern.heads:
        problems.append(f"pattern '{pattern.name}' declares heads {pattern.heads} but q has {Hq} heads")
    if D == 0 or N == 0 or B == 0 or v.shape[3] == 0:
        problems.append(f"empty dimension in q shape {tuple(q.shape)} or v shape {tuple(v.shape)}")
    if problems:
        raise AttnError("\n".join(problems))

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise AttnError(f"scale must be a finite number, got {scale!r}")

    return Call(pattern, q, k, v, float(scale), _check_inputs(pattern, inputs, B, q.device), planner)


def _check_inputs(pattern: Pattern, inputs: Mapping[str, Any], B: int, device) -> dict[str, torch.Tensor]:
    """The call's inputs as int64 tensors on ``device``, ``ids [B, N]`` and ``length [B]``."""
    got = check_inputs(pattern, inputs, batch=B, spell=by_keyword)
    return {name: torch.as_tensor(np.broadcast_to(a, (B, *a.shape[1:])).copy(), device=device)
            for name, a in got.items()}
