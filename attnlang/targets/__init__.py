"""Hardware target profiles for the simulator: JSON data files, not code.

The package ships ``h100``, ``h200``, ``b200``, ``a100`` and ``cpu``. A profile in the user
directory (``$ATTNLANG_TARGETS``, else ``$XDG_CONFIG_HOME/attnlang/targets``, else
``~/.config/attnlang/targets``) with the same name wins over the packaged one, which is where
``attnlang calibrate`` writes. A path to a ``.json`` file works as a target too.

>>> t = load_target("h100")
>>> t.units, t.tflops["bf16"]
(132, 989.0)

Schema (every field required unless marked optional; times in nanoseconds)::

    name, kind ("gpu" | "cpu"), description, source      strings
    units           int    SMs (gpu); workers the tile work is spread over (cpu: 1, torch ops
                           already use every core internally)
    cores           int    optional, informational (cpu)
    tflops          {dtype: float}   peak tensor throughput (gpu) / measured matmul rate (cpu)
    bandwidth_gbs   float  memory bandwidth (token permutation passes)
    interconnect_gbs      float  optional: device-to-device bandwidth, each way, per device
                           (NVLink; gloo loopback for cpu): context-parallel step times
    interconnect_source   string optional: where that figure comes from
    head_dim        int    head dim at which efficiency and tile costs were measured
    index_read_ns   float  cost of reading one index-table entry (tabulated plans only)
    forward, backward      {efficiency: dense kernel's fraction of tflops,
                            tile_fixed_ns: per-tile cost that does not scale with head_dim,
                            mask_cost: extra time of a partial tile, as a fraction of a full one,
                            cta_overhead_ns: per query tile (CTA) cost: Q load, epilogue,
                            chunk_overhead_ns: optional (0), per fused call (chunk executors),
                            gather_cost: optional (0), extra time of a key tile read by index
                                         rather than as a strided view, as a fraction of a full
                                         tile (chunk executors)}
    backward.flop_ratio    float  backward FLOPs / forward FLOPs (2.5 for FlashAttention-2)
    executor        optional {pad_rows: bool, mask_whole_row: bool,
                              backward: "two-pass" | "query-major", chunk_bytes: int}: how the
                    backend walks a plan (defaults: false, false, "two-pass", 0 = generated GPU
                    kernels, a CTA per tile; the CPU torch executor has chunk_bytes > 0: one
                    fused call per chunk of query tiles, laid out as ``attnlang.rows`` does,
                    which decides padding and masks itself, and a query-major backward)
    calibration     optional: what ``attnlang calibrate`` measured
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping

from attnlang.errors import AttnError, did_you_mean

PACKAGED = pathlib.Path(__file__).parent
REQUIRED = ("name", "kind", "description", "source", "units", "tflops", "bandwidth_gbs", "head_dim",
            "index_read_ns", "forward", "backward")
PASS_FIELDS = ("efficiency", "tile_fixed_ns", "mask_cost", "cta_overhead_ns")
OPTIONAL_PASS_FIELDS = ("chunk_overhead_ns", "gather_cost")
KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class PassCosts:
    """Measured or estimated costs of one direction (forward or backward) of the dense kernel."""

    efficiency: float  # dense kernel's fraction of the target's tflops
    tile_fixed_ns: float  # per visited tile, independent of head_dim
    mask_cost: float  # partial tile = (1 + mask_cost) x full tile
    cta_overhead_ns: float  # per CTA (query tile, or key tile in the dK/dV pass)
    flop_ratio: float = 1.0  # FLOPs relative to the forward (backward: 2.5)
    chunk_overhead_ns: float = 0.0  # per fused call (chunk executors)
    gather_cost: float = 0.0  # gathered key tile = (1 + gather_cost) x full tile (chunk executors)


@dataclass(frozen=True)
class Executor:
    """How the backend walks a plan (see the schema in the module docstring)."""

    pad_rows: bool = False  # ragged query-tile rows padded to the widest row of their head group
    mask_whole_row: bool = False  # a row with any partial/dummy slot pays the mask on every slot
    backward: str = "two-pass"  # "two-pass" (dK/dV pass + dQ pass) | "query-major"
    chunk_bytes: int = 0  # > 0: one fused call per chunk of query tiles of this many fp32 scores


@dataclass(frozen=True)
class Target:
    """A hardware profile: what the simulator needs to know about one machine."""

    name: str
    kind: str
    description: str
    source: str
    units: int
    tflops: Mapping[str, float]
    bandwidth_gbs: float
    head_dim: int
    index_read_ns: float
    forward: PassCosts
    backward: PassCosts
    path: str  # where it was loaded from
    cores: int | None = None
    executor: Executor = Executor()
    calibration: Mapping[str, Any] | None = None
    interconnect_gbs: float | None = None  # device-to-device GB/s each way (context parallelism)

    def peak(self, dtype: str) -> float:
        """FLOP/s for ``dtype``; AttnError naming the supported ones otherwise."""
        if dtype not in self.tflops:
            raise AttnError(f"target '{self.name}' has no throughput for dtype '{dtype}'"
                            f"{did_you_mean(dtype, self.tflops)}",
                            hint=f"dtypes of this target: {', '.join(self.tflops)}")
        return float(self.tflops[dtype]) * 1e12


def user_dir() -> pathlib.Path:
    """Where user (calibrated) profiles live; they win over packaged ones of the same name."""
    if os.environ.get("ATTNLANG_TARGETS"):
        return pathlib.Path(os.environ["ATTNLANG_TARGETS"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(base) / "attnlang" / "targets"


def known_targets() -> list[str]:
    """Names of every packaged or user profile."""
    names = {p.stem for p in PACKAGED.glob("*.json")}
    if user_dir().is_dir():
        names |= {p.stem for p in user_dir().glob("*.json")}
    return sorted(names)


def load_target(target: "str | os.PathLike | Target") -> Target:
    """A profile by name (user dir first, then packaged) or by path to a JSON file."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, (str, os.PathLike)):
        raise AttnError(f"target must be a name or a path, got {type(target).__name__}")
    text = str(target)
    if text.endswith(".json") or os.sep in text:
        path = pathlib.Path(text)
        if not path.is_file():
            raise AttnError(f"no such target profile file: {text}")
    else:
        user = user_dir() / f"{text}.json"
        path = user if user.is_file() else PACKAGED / f"{text}.json"
        if not path.is_file():
            known = known_targets()
            raise AttnError(f"unknown target '{text}'{did_you_mean(text, known)}",
                            hint=f"known targets: {', '.join(known)}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AttnError(f"cannot read target profile {path}: {e}") from None
    return target_from_dict(doc, str(path))


def target_from_dict(doc: Any, path: str = "<dict>") -> Target:
    """Validate a profile document; AttnError naming every missing or bad field."""
    if not isinstance(doc, dict):
        raise AttnError(f"target profile {path} must be a JSON object, got {type(doc).__name__}")
    problems = [f"missing field '{f}'" for f in REQUIRED if f not in doc]
    for direction in ("forward", "backward"):
        sec = doc.get(direction)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            problems.append(f"'{direction}' must be an object with {', '.join(PASS_FIELDS)}")
            continue
        want = PASS_FIELDS + (("flop_ratio",) if direction == "backward" else ())
        problems += [f"missing field '{direction}.{f}'" for f in want if f not in sec]
        problems += [f"'{direction}.{f}' = {sec[f]!r} must be a non-negative number"
                     for f in want + OPTIONAL_PASS_FIELDS if f in sec and not _nonneg(sec[f])]
        if _nonneg(sec.get("efficiency")) and not 0 < sec["efficiency"] <= 1:
            problems.append(f"'{direction}.efficiency' = {sec['efficiency']} must lie in (0, 1]")
    if "kind" in doc and doc["kind"] not in KINDS:
        problems.append(f"'kind' = {doc['kind']!r} must be one of {', '.join(KINDS)}")
    if "units" in doc and not (isinstance(doc["units"], int) and doc["units"] >= 1):
        problems.append(f"'units' = {doc['units']!r} must be a positive integer")
    if "head_dim" in doc and not (isinstance(doc["head_dim"], int) and doc["head_dim"] >= 1):
        problems.append(f"'head_dim' = {doc['head_dim']!r} must be a positive integer")
    for f in ("bandwidth_gbs", "index_read_ns") + (("interconnect_gbs",) if "interconnect_gbs" in doc else ()):
        if f in doc and not _nonneg(doc[f]):
            problems.append(f"'{f}' = {doc[f]!r} must be a non-negative number")
    tf = doc.get("tflops")
    if "tflops" in doc and not (isinstance(tf, dict) and tf and all(_nonneg(v) and v > 0 for v in tf.values())):
        problems.append(f"'tflops' = {tf!r} must map dtypes to positive numbers, e.g. {{\"bf16\": 989}}")
    ex = doc.get("executor", {})
    if not isinstance(ex, dict) or set(ex) - {"pad_rows", "mask_whole_row", "backward", "chunk_bytes"} \
            or ex.get("backward", "two-pass") not in ("two-pass", "query-major") \
            or not (isinstance(ex.get("chunk_bytes", 0), int) and ex.get("chunk_bytes", 0) >= 0):
        problems.append(f"'executor' = {ex!r} must be an object with pad_rows, mask_whole_row (booleans), "
                        "backward (\"two-pass\" or \"query-major\") and chunk_bytes (a non-negative integer)")
        ex = {}
    if problems:
        raise AttnError(f"target profile {path} is invalid: " + "; ".join(problems),
                        hint="see `attnlang.targets` for the schema, or start from a packaged profile")

    def costs(sec: dict) -> PassCosts:
        return PassCosts(float(sec["efficiency"]), float(sec["tile_fixed_ns"]), float(sec["mask_cost"]),
                         float(sec["cta_overhead_ns"]), float(sec.get("flop_ratio", 1.0)),
                         float(sec.get("chunk_overhead_ns", 0.0)), float(sec.get("gather_cost", 0.0)))

    return Target(str(doc["name"]), doc["kind"], str(doc["description"]), str(doc["source"]), doc["units"],
                  {str(k): float(v) for k, v in doc["tflops"].items()}, float(doc["bandwidth_gbs"]),
                  doc["head_dim"], float(doc["index_read_ns"]), costs(doc["forward"]), costs(doc["backward"]),
                  path, doc.get("cores"), Executor(**ex), doc.get("calibration"),
                  float(doc["interconnect_gbs"]) if "interconnect_gbs" in doc else None)


def _nonneg(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


__all__ = ["Executor", "PassCosts", "Target", "known_targets", "load_target", "target_from_dict", "user_dir"]
