"""What context parallelism over ``R`` ranks would do with a plan: ``attnlang simulate --ranks R``.

For a :class:`~attnlang.distributed.Sharding` of the plan (the one ``ContextParallel`` would use)
and the single-device :class:`~attnlang.simulate.Report` of the same plan on a target:

* **work** per rank (the sharding's cost model) and the imbalance, max / mean;
* **bytes** each rank receives: forward K/V tiles, backward dK/dV partial sums (fp32), against a
  full K/V all-gather (what ring attention and all-gather context parallelism move forward);
* **predicted step time**: each rank's share of the single-device kernel time (its work over the
  total work) and its transfer time at the target's ``interconnect_gbs``, overlapped as the
  runtime overlaps them (own tiles while the exchange runs): ``max(compute, transfer)`` per
  rank, the slowest rank sets the step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from attnlang.distributed.shard import Sharding


@dataclass(frozen=True)
class RankReport:
    """Per-rank work, bytes and predicted times of a context-parallel run (see the module doc)."""

    ranks: int
    layout: str  # Sharding.describe()
    work: tuple[float, ...]  # share of the total work per rank
    imbalance: float
    forward_bytes: tuple[int, ...]  # received per rank
    backward_bytes: tuple[int, ...]
    all_gather_bytes: tuple[int, ...]  # a full K/V all-gather, received per rank
    interconnect_gbs: float | None
    single_forward_s: float
    single_backward_s: float
    forward_s: float  # predicted step, slowest rank
    backward_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        def mib(b):
            return f"{b / 2**20:.2f} MiB"

        rows = [("rank", "work", "fwd recv", "bwd recv", "all-gather")]
        for r in range(self.ranks):
            rows.append((str(r), f"{self.work[r]:.3f}", mib(self.forward_bytes[r]), mib(self.backward_bytes[r]),
                         mib(self.all_gather_bytes[r])))
        w = [max(len(row[i]) for row in rows) for i in range(5)]
        table = ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
        fb, ag = max(self.forward_bytes), max(self.all_gather_bytes)
        out = [f"context parallel over {self.ranks} ranks: {self.layout}",
               f"work imbalance (max / mean) {self.imbalance:.3f}; largest forward receive "
               f"{mib(fb)} = {fb / ag if ag else 0:.3f} of a K/V all-gather"] + table
        if self.interconnect_gbs:
            out.append(f"predicted step at {self.interconnect_gbs:g} GB/s per direction: forward "
                       f"{_t(self.forward_s)} (one device {_t(self.single_forward_s)}, "
                       f"{_ratio(self.single_forward_s, self.forward_s)}), backward {_t(self.backward_s)} "
                       f"(one device {_t(self.single_backward_s)}, {_ratio(self.single_backward_s, self.backward_s)})")
        else:
            out.append("the target has no interconnect_gbs: no step time predicted")
        return "\n".join(out)

    def to_markdown(self) -> str:
        return "```\n" + str(self) + "\n```\n"


def rank_report(sh: Sharding, single_forward_s: float, single_backward_s: float, *, kv_heads: int,
                head_dim: int, batch: int, dtype_bytes: int, interconnect_gbs: float | None) -> RankReport:
    """The report for sharding ``sh`` given the single-device kernel times of the same plan."""
    token = batch * kv_heads * head_dim * 2  # K and V of one token: elements
    fwd = sh.bytes_moved(token * dtype_bytes)
    bwd = sh.bytes_moved(token * 4)  # dK/dV partial sums travel in fp32
    total = float(sh.work.sum())
    share = sh.work / total if total > 0 else np.full(sh.world_size, 1.0 / sh.world_size)
    bw = interconnect_gbs * 1e9 if interconnect_gbs else None

    def step(single: float, received: np.ndarray) -> float:
        comm = received / bw if bw else np.zeros_like(share)
        return float(np.maximum(share * single, comm).max())

    return RankReport(sh.world_size, sh.describe(), tuple(float(x) for x in share), sh.imbalance,
                      tuple(int(x) for x in fwd["forward"]), tuple(int(x) for x in bwd["backward"]),
                      tuple(int(x) for x in fwd["all_gather"]), interconnect_gbs,
                      single_forward_s, single_backward_s,
                      step(single_forward_s, fwd["forward"]), step(single_backward_s, bwd["backward"]))


def _t(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "inf"
