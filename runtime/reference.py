"""The `reference` backend: dense masked attention, the oracle (small sizes only).

Scores in fp32 over the full N x N grid, the mask from the Pattern IR's own ``allowed``
(evaluated per batch item when the pattern reads runtime inputs), a masked softmax where a row
with no allowed key gives a zero output and ``lse = -inf``. Differentiable by autograd.
"""
from __future__ import annotations

import torch

from attnlang.errors import AttnError
from attnlang.runtime.call import Call

MAX_ELEMENTS = 1 << 28  # B * H * N * N scores held at once; beyond this use a sparse backend


def dense_masks(call: Call) -> torch.Tensor:
    """bool ``[B or 1, Hq, N, N]`` on the call's device: the pattern's literal mask."""
    p = call.pattern
    items = range(call.batch) if call.inputs else range(1)
    masks = [torch.from_numpy(p.mask(heads=call.heads, inputs=call.item_inputs(b) if call.inputs else None))
             for b in items]
    return torch.stack(masks).to(call.q.device)


def supports(call: Call) -> str | None:
    n = call.pattern.n
    if call.batch * call.heads * n * n > MAX_ELEMENTS:
        return (f"the reference backend holds B*H*N*N = {call.batch * call.heads * n * n} scores; "
                f"that is over its limit of {MAX_ELEMENTS}: use backend='torch'")
    return None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, D] in q's dtype, lse [B, Hq, N] fp32)``."""
    why = supports(call)
    if why:
        raise AttnError(why)
    q, k, v = call.q.float(), call.k.float(), call.v.float()
    group = call.heads // call.kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    mask = dense_masks(call)
    # Rows with no allowed key get zero scores (finite softmax and gradients), then are zeroed.
    empty = ~mask.any(dim=-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(empty, 0.0)
    out = torch.matmul(p, v)
    return out.to(call.q.dtype), lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf"))
