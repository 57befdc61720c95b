"""The `reference` backend: dense masked attention, the oracle (small sizes only).

Scores in fp32 over the full N x N grid, the mask from the Pattern IR's own ``allowed``
(evaluated per batch item when the pattern reads runtime inputs), a masked softmax where a row
with no allowed key gives a zero output and ``lse = -inf``. Differentiable by autograd. Masked
pairs are excluded from ``P @ V`` and from the gradients, not multiplied by zero, so a row never
depends on a key or value it may not see, even a NaN/Inf one.
"""
from __future__ import annotations

import torch

from attnlang.errors import AttnError
from attnlang.pattern import Pyramid
from attnlang.pyramid import level_table, pool_members, token_structure
from attnlang.routing import pattern_content
from attnlang.runtime.call import Call
from attnlang.runtime.nonfinite import MaskedPV, MaskedScores

MAX_ELEMENTS = 1 << 28  # B * H * N * N scores held at once; beyond this use a sparse backend


def dense_masks(call: Call) -> torch.Tensor:
    """bool ``[B or 1, Hq, N, N]`` on the call's device: the pattern's literal mask."""
    p = call.pattern
    items = range(call.batch) if call.inputs else range(1)
    routed = p.reads_content and not isinstance(p.attend, Pyramid)
    if routed:  # route: the numpy oracle's selection, per batch item
        items = range(call.batch)
        content = [pattern_content(p, call.q[b].detach().float().cpu().numpy(),
                                   call.k[b].detach().float().cpu().numpy(), call.scale) for b in items]
    masks = [torch.from_numpy(p.mask(heads=call.heads, inputs=call.item_inputs(b) if call.inputs else None,
                                     content=content[b] if routed else None))
             for b in items]
    return torch.stack(masks).to(call.q.device)


def supports(call: Call) -> str | None:
    n = call.pattern.n
    if call.batch * call.heads * n * n > MAX_ELEMENTS:
        return (f"the reference backend holds B*H*N*N = {call.batch * call.heads * n * n} scores; "
                f"that is over its limit of {MAX_ELEMENTS}: use backend='torch'")
    return None


def run(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [B, Hq, N, Dv] in q's dtype, lse [B, Hq, N] fp32)``."""
    why = supports(call)
    if why:
        raise AttnError(why)
    if isinstance(call.pattern.attend, Pyramid):
        return _pyramid(call)
    q, k, v = call.q.float(), call.k.float(), call.v.float()
    group = call.heads // call.kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = dense_masks(call)
    # Scores and P @ V read allowed pairs only, forward and backward: a NaN/Inf key or value a
    # row may not see never reaches it through 0 * NaN (runtime/nonfinite.py).
    s = MaskedScores.apply(q, k, mask, call.scale)
    # Rows with no allowed key get zero scores (finite softmax and gradients), then are zeroed.
    empty = ~mask.any(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(empty, 0.0)
    out = MaskedPV.apply(p, v, mask)
    return out.to(call.q.dtype), lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf"))


def _pyramid(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """PSA literally (docs/language.md §13.2): levels from the numpy oracle, then dense attention where
    each key's K/V is replaced by the mean of its pooled run at the level its block was given,
    keys of invisible runs and skipped blocks masked. Equal to one pooled key with ``+ ln(l)``."""
    p, layout = call.pattern.attend, call.pattern.layout
    group = call.heads // call.kv_heads
    k = call.k.float().repeat_interleave(group, dim=1)
    v = call.v.float().repeat_interleave(group, dim=1)
    q = call.q.float()
    B, H, N, _ = q.shape
    members = {lv: torch.from_numpy(pool_members(layout, p, lv)).to(q.device) for lv in set(p.levels)}

    def pooled(x: torch.Tensor, lv: int) -> torch.Tensor:  # [B, H, N, D], each key -> its run's mean
        m = members[lv]
        sums = x.new_zeros(B, H, N // lv, x.shape[-1]).index_add_(2, m, x)
        return (sums / lv).index_select(2, m)

    level = torch.empty(B, H, N, N, dtype=torch.int32)
    allowed = torch.empty(B, H, N, N, dtype=torch.bool)
    for b in range(B):
        table = level_table(p, layout, call.q[b].detach().float().cpu().numpy(),
                            call.k[b].detach().float().cpu().numpy(), call.scale)
        for h in range(H):
            lvl, vis = token_structure(p, layout, table[h])
            level[b, h], allowed[b, h] = torch.from_numpy(lvl), torch.from_numpy(vis)
    level, allowed = level.to(q.device), allowed.to(q.device)
    s = torch.full((B, H, N, N), float("-inf"), device=q.device)
    at = {lv: allowed & (level == lv) for lv in set(p.levels)}  # pairs each level serves
    for lv in set(p.levels):  # masked products: NaN/Inf in a hidden run never reaches a row
        s = torch.where(at[lv], MaskedScores.apply(q, pooled(k, lv), at[lv], call.scale), s)
    empty = ~allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    prob = torch.exp(s - lse).masked_fill(empty, 0.0)
    out = sum(MaskedPV.apply(prob, pooled(v, lv), at[lv]) for lv in set(p.levels))
    return out.to(call.q.dtype), lse.squeeze(-1).masked_fill(empty.squeeze(-1), float("-inf"))
