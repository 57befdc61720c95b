"""Execution backends; torch and triton are imported lazily, only here.

A backend is a module with ``supports(call) -> str | None`` (None when it can run the call, else
the reason it cannot) and ``run(call) -> (out, lse)``, where ``call`` is an
:class:`attnlang.runtime.call.Call`. ``BACKENDS`` maps backend names to those modules.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "reference": "attnlang.runtime.reference",
    "torch": "attnlang.runtime.torch_exec",
    "flex": "attnlang.runtime.flex",
    "triton": "attnlang.runtime.triton",
}


def backend_module(name: str) -> ModuleType:
    """Import a backend by name (lazily: torch/triton load only when a backend is used)."""
    return importlib.import_module(BACKENDS[name])
