"""Runtime inputs checked in one place: names, integer dtype, shape, batch and range.

Every entry point that takes runtime inputs (``input doc: ids[N]``, ``input len: length``)
checks them here: a compiled call (``fn(q, k, v, doc=...)``), the planner (``make_plan(...,
inputs=...)``), ``to_block_mask(..., inputs=...)`` and the CLI's ``--input``. Only how a user
passes an input differs between them, so each caller says that (``spell``) and the messages,
and what is accepted, are the same everywhere.

Values may be numpy arrays, Python ints/lists or torch tensors (read on the host, without
importing torch, so ``import attnlang`` stays free of it). The result is numpy ``int64``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from attnlang.errors import AttnError, Diagnostic, did_you_mean

# How a caller's user passes input ``name`` (the hint of a missing input).
Spell = Callable[[str], str]


def by_keyword(name: str) -> str:
    """A compiled call: ``fn(q, k, v, doc=...)``."""
    return f"fn(q, k, v, {name}=...)"


def by_dict(name: str) -> str:
    """``make_plan``/``to_block_mask``: ``inputs={'doc': ...}``."""
    return f"inputs={{'{name}': ...}}"


def check_names(pattern: Any, names: Iterable[str], spell: Spell = by_dict) -> None:
    """Refuse input names ``pattern`` does not declare, and declared inputs left out."""
    declared = [i.name for i in pattern.inputs]
    given = list(names)
    diags = []
    extra = sorted(set(given) - set(declared))
    if extra:
        known = ", ".join(declared) or "none"
        close = did_you_mean(extra[0], declared) if len(extra) == 1 else ""
        diags.append(Diagnostic(f"unknown runtime input(s) {extra}: pattern '{pattern.name}' "
                                f"declares {known}{close}"))
    missing = [n for n in declared if n not in given]
    if missing:
        diags.append(Diagnostic(f"pattern '{pattern.name}' needs runtime input(s) {missing}",
                                hint="pass the missing runtime inputs by name, e.g. " + ", ".join(spell(m) for m in missing)))
    if diags:
        raise AttnError(diags)


def check_inputs(pattern: Any, inputs: Mapping[str, Any] | None, *, batch: int | None = None,
                 item: bool = False, spell: Spell = by_dict) -> dict[str, np.ndarray]:
    """``inputs`` checked against ``pattern``'s declarations, as numpy ``int64`` arrays.

    Batched (default): ids ``[B, N]`` or ``[N]`` (shared by every item), a length ``[B]`` or one
    length; each result has a leading batch dim, ``1`` for a shared value. ``batch`` is the
    call's ``B`` (``None``: taken from the inputs, which must then agree on it). ``item``: one batch item,
    as the planner reads them: ids ``[N]`` and a length, returned as ``[N]`` and a 0-d array.
    Every length lies in ``0..N``. Raises one AttnError naming every problem found.
    """
    inputs = dict(inputs or {})
    check_names(pattern, inputs, spell)
    n = pattern.n
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    for inp in pattern.inputs:
        a = _integers(inp.name, inputs[inp.name], problems)
        if a is None:
            continue
        shape = tuple(a.shape)
        if item:
            ok = a.size == n and a.ndim in (1, 2) if inp.kind == "ids" else a.size == 1
            if not ok:
                want = f"[N] = [{n}]" if inp.kind == "ids" else "one length (a 0-d array or an int)"
                problems.append(f"runtime input '{inp.name}' ({inp.kind}) must be {want} for one batch "
                                f"item, got shape {shape}")
                continue
            a = a.reshape(-1) if inp.kind == "ids" else a.reshape(())
        elif inp.kind == "ids":
            if a.ndim == 1 and a.shape[0] == n:
                a = a[None]  # shared by every batch item
            elif a.ndim == 2 and batch is not None and a.shape[0] != batch:
                a = a[:0]  # batched, for another batch size: refused below
            if a.ndim != 2 or a.shape[1] != n or a.shape[0] == 0:
                b = batch if batch is not None else "B"
                problems.append(f"runtime input '{inp.name}' (ids) must have shape [B, N] = [{b}, {n}] "
                                f"or [N], got {shape}")
                continue
        else:
            if a.ndim == 0:
                a = a[None]  # shared by every batch item
            elif a.ndim == 1 and batch is not None and a.shape[0] != batch:
                a = a[:0]  # batched, for another batch size: refused below
            if a.ndim != 1 or a.shape[0] == 0:
                b = batch if batch is not None else "B"
                problems.append(f"runtime input '{inp.name}' (length) must have shape [B] = [{b}] or be a "
                                f"scalar, got {shape}")
                continue
        if inp.kind == "length" and ((a < 0) | (a > n)).any():
            problems.append(f"runtime input '{inp.name}' (length) must lie in 0..{n}, got {a.tolist()}")
            continue
        out[inp.name] = a
    if problems:
        raise AttnError("\n".join(problems))
    if not item and batch is None:
        sizes = {name: a.shape[0] for name, a in out.items() if a.shape[0] != 1}
        if len(set(sizes.values())) > 1:
            raise AttnError(f"runtime inputs disagree on the batch size: {sizes}")
    return out


def batch_of(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch that checked (batched) inputs fix: 1 when every value is shared."""
    return max((a.shape[0] for a in inputs.values()), default=1)


def _integers(name: str, v: Any, problems: list[str]) -> np.ndarray | None:
    """``v`` as an int64 numpy array, or None after saying why it is not one."""
    if hasattr(v, "detach") and hasattr(v, "is_complex"):  # a torch tensor, read on the host
        dt = v.dtype
        if dt.is_floating_point or v.is_complex() or str(dt) == "torch.bool":
            problems.append(f"runtime input '{name}' must be an integer tensor, got {dt}")
            return None
        v = v.detach().cpu().numpy()
    try:
        a = np.asarray(v)
    except (TypeError, ValueError, OverflowError):
        a = None
    if a is not None and (a.dtype == object or a.dtype.kind in "US"):
        try:  # Python ints beyond int64 give object arrays: refused below, like other non-integers
            a = np.asarray(v, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            a = None
    if a is None:
        problems.append(f"runtime input '{name}' must hold integers that fit in int64 (-2**63 .. 2**63 - 1)")
        return None
    if not np.issubdtype(a.dtype, np.integer):
        problems.append(f"runtime input '{name}' must be an integer array, got {a.dtype}")
        return None
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        problems.append(f"runtime input '{name}' must hold integers that fit in int64 (-2**63 .. 2**63 - 1)")
        return None
    return a.astype(np.int64, copy=False)
