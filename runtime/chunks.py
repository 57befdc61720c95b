"""Chunk kernels shared by the torch tile executor, the routed executor and ``ContextParallel``:
attention of a block of query rows against gathered key/value tiles with an additive ``0 / -inf``
bias.

:func:`chunk_forward` / :func:`chunk_backward` use PyTorch's fused CPU flash-attention op where
it exists (CPU tensors, ``Dv == D``, no gradient into ``lse``), else an explicit matmul /
softmax version of the same computation; with ``exact`` (an input holds NaN/Inf) masked pairs
are excluded with ``where`` and :func:`~attnlang.runtime.nonfinite.masked_mm` products. Softmax
is in fp32 whatever the caller's dtype; ``lse`` is 0 (not -inf) on rows with no allowed key.
"""
from __future__ import annotations

import torch

from attnlang.runtime.nonfinite import masked_mm

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
USE_FUSED = True  # tests switch this off to check the explicit chunk kernel on CPU


def _fused_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    # The fused op wants one head size for Q/K and V: Dv != D (MLA) runs the explicit kernel.
    return USE_FUSED and _FUSED is not None and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def chunk_forward(q, k, v, bias, scale, exact: bool = False):
    """``(out, lse)`` of one chunk; ``lse`` is 0 (not -inf) on rows with no allowed key.

    ``exact``: some input holds NaN/Inf, so masked pairs are excluded with ``where`` (an additive
    ``-inf`` bias gives ``NaN + -inf = NaN``, and ``P @ V`` gives ``0 * NaN``): see
    :mod:`attnlang.runtime.nonfinite`.
    """
    if exact and bias is not None:
        return _chunk_forward_exact(q, k, v, bias == 0, scale)
    if _fused_ok(q, v):
        return _FUSED(q, k, v, attn_mask=bias, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s.add_(bias)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: every score is -inf
    p = s.sub_(m).exp_()
    den = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v).div_(torch.where(den > 0, den, torch.ones_like(den)))
    lse = torch.where(den > 0, m + torch.log(den), torch.zeros_like(den))
    return out, lse.squeeze(-1)


def _chunk_forward_exact(q, k, v, allowed, scale):
    s = torch.where(allowed, torch.matmul(q, k.transpose(-1, -2)).mul_(scale), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # empty rows: every score is -inf
    p = torch.where(allowed, torch.exp(s - m), 0.0)
    den = p.sum(dim=-1, keepdim=True)
    # A row that sees a NaN keeps den = NaN: its out and lse stay NaN (never an empty row's 0).
    out = masked_mm(p, v, allowed).div_(torch.where(den == 0, torch.ones_like(den), den))
    lse = torch.where(den == 0, torch.zeros_like(den), m + torch.log(den))
    return out, lse.squeeze(-1)


def chunk_backward(do, q, k, v, o, lse, bias, scale, dlse, exact: bool = False):
    """``(dq, dk, dv)`` of one chunk; ``dlse`` (or None) is the gradient flowing into ``lse``;
    ``exact`` as in :func:`chunk_forward`."""
    if exact and bias is not None:
        return _chunk_backward_exact(do, q, k, v, o, lse, bias == 0, scale, dlse)
    if dlse is None and _fused_ok(q, v) and _FUSED_BWD is not None:
        if bias is not None:
            # The fused backward is about 2x slower with a mask broadcast over heads (measured).
            bias = bias.expand(q.shape[0], -1, -1, -1).contiguous()
        return _FUSED_BWD(do, q, k, v, o, lse, 0.0, False, attn_mask=bias, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s.add_(bias)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2))
    delta = (do * o).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.unsqueeze(-1)
    ds = p.mul_(dp.sub_(delta)).mul_(scale)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def _chunk_backward_exact(do, q, k, v, o, lse, allowed, scale, dlse):
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    p = torch.where(allowed, torch.exp(s - lse.unsqueeze(-1)), 0.0)
    allowed_t = allowed.transpose(-1, -2)
    dv = masked_mm(p.transpose(-1, -2), do, allowed_t)
    delta = (do * o).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.unsqueeze(-1)
    ds = torch.where(allowed, p * (torch.matmul(do, v.transpose(-1, -2)) - delta), 0.0).mul_(scale)
    return masked_mm(ds, k, allowed), masked_mm(ds.transpose(-1, -2), q, allowed_t), dv


__all__ = ["chunk_forward", "chunk_backward", "USE_FUSED"]
