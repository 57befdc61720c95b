"""Attention over several tile sets: each query row attends to the union of the key sets that
the sets give it, merged on the fly by log-sum-exp (exact, as the pieces are disjoint).

A tile set is a list of tiles, each a block of query rows against gathered key rows with an
optional ``0 / -inf`` mask. Two layouts exist: :class:`Tiles` (one key block per tile, the
routed executor's static part and routed pairs) and :class:`GroupTiles` (one tile per query
group, its keys the concatenation of the group's selected blocks; PSA's pyramid levels use it
with pooled keys and a per-level ``shift``). :class:`TileSetAttention` runs them with the
shared chunk kernels (:mod:`attnlang.runtime.chunks`), forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlang.runtime.chunks import chunk_backward, chunk_forward
from attnlang.runtime.nonfinite import all_finite

CHUNK_BYTES = 4 << 20  # fp32 scores per fused call (as the tile executor)
BIAS_CACHE_BYTES = 64 << 20  # a static set's chunk biases are kept when they take at most this
MERGE_SLACK = 20.0  # a merged row's reference moves only when a piece's lse exceeds it by this


@dataclass
class Tiles:
    """Query rows against key blocks, one block per tile; rows and keys index flat tensors."""

    block_m: int
    q_rows: torch.Tensor  # int64 [T * BM]: flat query row (the zero row for padding)
    k_rows: torch.Tensor  # int64 [T, BK]: flat key row (the zero row for padding)
    mask_id: np.ndarray  # int64 [T]: row of ``allow`` for masked tiles, -1 for unmasked ones
    allow: torch.Tensor  # bool [M, BM, BK]: allowed pairs of masked tiles
    row_empty: torch.Tensor  # bool [T * BM]: rows whose mask allows no key
    dest: torch.Tensor  # int64 [T * BM]: output row (b*Hq + h)*N + token; B*Hq*N for padding
    chunk_bias: dict | None = None  # static tiles keep chunk biases (by mask ids, up to BIAS_CACHE_BYTES)
    shift = 0.0  # not a field: these keys are never pooled (GroupTiles.shift)

    @property
    def count(self) -> int:
        return self.k_rows.shape[0]

    @property
    def block_k(self) -> int:
        return self.k_rows.shape[1]

    def chunks(self) -> list[tuple[int, int]]:
        step = max(1, CHUNK_BYTES // (self.block_m * self.block_k * 4))
        return [(c0, min(self.count, c0 + step)) for c0 in range(0, self.count, step)]

    def key_rows(self, c0: int, c1: int) -> torch.Tensor:
        return self.k_rows[c0:c1].reshape(-1)

    def bias(self, c0: int, c1: int) -> torch.Tensor | None:
        """Additive ``0 / -inf`` bias ``[1, c, BM, BK]`` of tiles ``c0..c1``, None when unmasked."""
        ids = self.mask_id[c0:c1]
        if (ids < 0).all():
            return None
        key = ids.tobytes()  # keyed by content: every head of the static part repeats its chunks
        if self.chunk_bias is not None and key in self.chunk_bias:
            return self.chunk_bias[key]
        ok = self.allow.index_select(0, torch.from_numpy(np.maximum(ids, 0)).to(self.allow.device))
        ok |= torch.from_numpy(ids < 0).to(ok.device)[:, None, None]
        zero = torch.zeros((), device=ok.device)
        bias = torch.where(ok, zero, zero - torch.inf).unsqueeze(0)
        if self.chunk_bias is not None and (len(self.chunk_bias) + 1) * bias.numel() * 4 <= BIAS_CACHE_BYTES:
            self.chunk_bias[key] = bias
        return bias


@dataclass
class GroupTiles:
    """Routed pairs by query group: one tile per (batch item, head, group), its rows the group's
    tokens, its keys the concatenation of the group's selected blocks (tiles sorted by block
    count, so a chunk pads little). Masks only where ``extra`` cuts a block or keys are padding."""

    block_m: int
    bk: int  # keys per block
    q_rows: torch.Tensor  # int64 [T * BM]
    k_rows: torch.Tensor  # int64 [T, kmax * bk]
    kcount: np.ndarray  # int64 [T]: selected blocks per tile (sorted ascending)
    k_sink: int  # flat key row of padding
    slot_tile: np.ndarray  # int64 [P]: tile of each partial (group, block) pair
    slot_idx: np.ndarray  # int64 [P]: its position among the tile's blocks
    slot_allow: torch.Tensor  # bool [P, BM, bk]
    row_empty: torch.Tensor  # bool [T * BM]
    dest: torch.Tensor  # int64 [T * BM]
    shift: float = 0.0  # added to every row's lse before the merge: ln(l) for keys pooled l to 1 (PSA)

    @property
    def count(self) -> int:
        return self.k_rows.shape[0]

    def chunks(self) -> list[tuple[int, int]]:
        out, c0 = [], 0
        while c0 < self.count:
            # Tiles are sorted by block count: the chunk's last tile is its widest.
            c1 = c0 + 1
            while c1 < self.count and (c1 + 1 - c0) * self.block_m * int(self.kcount[c1]) * self.bk * 4 <= CHUNK_BYTES:
                c1 += 1
            out.append((c0, c1))
            c0 = c1
        return out

    def key_rows(self, c0: int, c1: int) -> torch.Tensor:
        return self.k_rows[c0:c1, :int(self.kcount[c1 - 1]) * self.bk].reshape(-1)

    def bias(self, c0: int, c1: int) -> torch.Tensor | None:
        """``[1, c, BM, w * bk]``: -inf on padding blocks (tiles with fewer than ``w``) and the
        masks of masked blocks; None when the chunk has neither. Only those blocks are written."""
        w = int(self.kcount[c1 - 1])
        lo, hi = np.searchsorted(self.slot_tile, [c0, c1])
        short = self.kcount[c0:c1] < w
        if lo == hi and not short.any():
            return None
        bias = torch.zeros((c1 - c0, self.block_m, w, self.bk), device=self.k_rows.device)
        if short.any():
            pt = np.repeat(np.arange(c1 - c0), w - self.kcount[c0:c1])
            ps = np.concatenate([np.arange(k, w) for k in self.kcount[c0:c1]])
            bias[torch.from_numpy(pt), :, torch.from_numpy(ps)] = float("-inf")
        if hi > lo:
            t = torch.from_numpy(self.slot_tile[lo:hi] - c0)
            i = torch.from_numpy(self.slot_idx[lo:hi])
            bias[t, :, i] = torch.where(self.slot_allow[lo:hi], 0.0, float("-inf"))
        return bias.view(1, c1 - c0, self.block_m, w * self.bk)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> fp32 ``[B*H*N + 1, D]`` (the last row is zero: padding reads it)."""
    x = x.float().reshape(-1, x.shape[-1])
    return torch.cat([x, x.new_zeros(1, x.shape[-1])])


def _merge(m: torch.Tensor, den: torch.Tensor, num: torch.Tensor, dest: torch.Tensor, o: torch.Tensor,
           lse: torch.Tensor) -> None:
    """Fold one chunk's rows ``(o [R, D], lse [R])`` into the running log-sum-exp merge of their
    destination rows: reference ``m``, ``den = sum exp(lse - m)``, ``num = sum o exp(lse - m)``.

    Exact, as the key sets of a row's pieces are disjoint; merging chunk by chunk keeps the
    pieces in cache instead of materialising one row per (query, block) pair. ``m`` is the first
    piece's ``lse`` and moves (rescaling the sums) only when a piece exceeds it by ``MERGE_SLACK``:
    weights stay below ``exp(MERGE_SLACK)``, and most chunks skip the rescale. A destination may
    repeat inside a chunk: its rescale then writes the same value more than once.
    """
    old = m.index_select(0, dest)
    up = lse > old + MERGE_SLACK  # every row's first piece, and pieces far above the reference
    new = old
    if up.any():
        m.scatter_reduce_(0, dest[up], lse[up], "amax")
        new = m.index_select(0, dest)
        grow = (new > old) & (old > float("-inf"))  # rows merged before whose reference rises
        if grow.any():
            g = dest[grow]
            f = torch.exp(old[grow] - new[grow])
            den.index_copy_(0, g, den.index_select(0, g) * f)
            num.index_copy_(0, g, num.index_select(0, g) * f[:, None])
    w = torch.exp(lse - torch.where(new > float("-inf"), new, torch.zeros_like(new)))  # 0 where nothing is allowed
    den.index_add_(0, dest, w)
    num.index_add_(0, dest, o * w[:, None])


class TileSetAttention(torch.autograd.Function):
    """Attention of every query row over the union of several tile sets' key sets:
    ``(out [B*Hq*N, D], lse [B*Hq*N])`` fp32, merged on the fly.

    The backward recomputes each chunk against the *merged* ``out`` and ``lse`` of its rows
    (``p = exp(s + shift - lse)``, ``delta = dO . out``), which is exact for disjoint key sets
    and lets the fused CPU backward run; only a gradient flowing into ``lse`` takes the
    explicit kernel. ``k``/``v`` may be any key rows the sets index (PSA passes pooled keys).
    """

    @staticmethod
    def forward(ctx, q, k, v, sets: list[Tiles], scale: float):
        D, Dv, rows = q.shape[-1], v.shape[-1], q[..., 0].numel()
        exact = not all_finite(q, k, v)  # NaN/Inf: masked pairs excluded, not zeroed
        qf, kf, vf = _flat(q), _flat(k), _flat(v)  # once for every set
        m = torch.full((rows + 1,), float("-inf"), device=q.device)  # the last row: padding's sink
        den = torch.zeros(rows + 1, device=q.device)
        num = torch.zeros((rows + 1, Dv), device=q.device)
        with torch.no_grad():
            for tl in sets:
                bm = tl.block_m
                for c0, c1 in tl.chunks():
                    rs = slice(c0 * bm, c1 * bm)
                    qg = qf.index_select(0, tl.q_rows[rs]).view(1, c1 - c0, bm, D)
                    idx = tl.key_rows(c0, c1)
                    kg = kf.index_select(0, idx).view(1, c1 - c0, -1, D)
                    vg = vf.index_select(0, idx).view(1, c1 - c0, -1, Dv)
                    o, l = chunk_forward(qg, kg, vg, tl.bias(c0, c1), scale, exact)
                    o, l, empty = o.reshape(-1, Dv), l.reshape(-1), tl.row_empty[rs]
                    if empty.any():  # a masked row with nothing allowed: lse = -inf (the fused op says 0)
                        o, l = o.masked_fill(empty[:, None], 0.0), l.masked_fill(empty, float("-inf"))
                    _merge(m, den, num, tl.dest[rs], o, l + tl.shift if tl.shift else l)
            none = den[:rows] == 0  # nothing allowed; a row that saw a NaN keeps den = NaN, and NaN
            safe = torch.where(none, torch.ones_like(den[:rows]), den[:rows])
            out = num[:rows] / safe[:, None]
            lse = torch.where(none, torch.full_like(safe, float("-inf")), m[:rows] + torch.log(safe))
        ctx.sets, ctx.scale, ctx.exact = sets, scale, exact
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:
            return None, None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        D = q.shape[-1]
        exact = ctx.exact or not all_finite(dout, dlse)
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        sink = lambda x: torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # noqa: E731
        # Rows that see nothing have lse = -inf and no pieces to differentiate: 0 keeps exp finite.
        seen = ~torch.isneginf(lse)  # NaN rows (they see a NaN) keep their NaN
        do = sink(torch.zeros_like(out) if dout is None else dout.float())
        of, lf = sink(out), sink(torch.where(seen, lse, torch.zeros_like(lse)))
        dl = None if dlse is None or not dlse.any() else sink(dlse.float().masked_fill(~seen, 0.0))
        for tl in ctx.sets:
            bm = tl.block_m
            for c0, c1 in tl.chunks():
                c, rs = c1 - c0, slice(c0 * bm, c1 * bm)
                qi, di, idx = tl.q_rows[rs], tl.dest[rs], tl.key_rows(c0, c1)
                view = lambda x: x.reshape(1, c, -1, x.shape[-1])  # noqa: E731
                dqc, dkc, dvc = chunk_backward(view(do.index_select(0, di)), view(qf.index_select(0, qi)),
                                                view(kf.index_select(0, idx)), view(vf.index_select(0, idx)),
                                                view(of.index_select(0, di)),
                                                (lf.index_select(0, di) - tl.shift).view(1, c, bm),
                                                tl.bias(c0, c1), ctx.scale,
                                                None if dl is None else dl.index_select(0, di).view(1, c, bm),
                                                exact)
                dq.index_add_(0, qi, dqc.reshape(-1, D))
                dk.index_add_(0, idx, dkc.reshape(-1, D))
                dv.index_add_(0, idx, dvc.reshape(-1, dv.shape[-1]))
        shape = lambda g, x: g[:-1].view(x.shape).to(x.dtype)  # noqa: E731
        return shape(dq, q), shape(dk, k), shape(dv, v), None, None


__all__ = ["Tiles", "GroupTiles", "TileSetAttention"]
