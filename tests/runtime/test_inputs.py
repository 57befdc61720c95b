"""Runtime inputs are checked in one place (attnlang.inputs): every entry point that takes them
(a compiled call, make_plan, to_block_mask, the CLI's --input) accepts and refuses the same values
with the same words."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnlang
from attnlang import AttnError, Pattern, make_plan
from attnlang.inputs import check_inputs
from attnlang.pattern import causal, same, valid

N = 16
P = Pattern.create(causal & same("doc") & valid("len"), N, inputs={"doc": "ids", "len": "length"})
DOC = np.repeat([0, 1], N // 2)


def _call(inputs):
    q = torch.zeros(1, 1, N, 4)
    return attnlang.compile(P, backend="reference")(q, q, q, **inputs)


def _plan(inputs):
    return make_plan(P, inputs=inputs)


def _mask(inputs):
    return attnlang.to_block_mask(P, inputs=inputs)


ENTRY_POINTS = [_call, _plan, _mask]


def _refusal(entry, inputs) -> str | None:
    try:
        entry(inputs)
    except AttnError as e:
        return str(e)
    return None


def test_make_plan_refuses_a_length_outside_0_to_n():
    """Regression: make_plan planned len=100 (and -3) for N=16 where a call refused it."""
    for bad in (N + 1, 100, -3):
        with pytest.raises(AttnError, match=rf"'len' \(length\) must lie in 0..{N}"):
            make_plan(P, inputs={"doc": DOC, "len": np.array(bad)})


def test_to_block_mask_refuses_float_ids():
    """Regression: to_block_mask truncated float ids to integers instead of refusing them."""
    with pytest.raises(AttnError, match="'doc' must be an integer array, got float64"):
        attnlang.to_block_mask(P, inputs={"doc": DOC + 0.5, "len": N})


def test_make_plan_refuses_unknown_inputs():
    """Regression: make_plan ignored an input the pattern does not declare (e.g. a typo)."""
    with pytest.raises(AttnError, match=r"unknown runtime input\(s\) \['dok'\].*did you mean 'doc'"):
        make_plan(P, inputs={"doc": DOC, "dok": DOC, "len": N})


@given(length=st.integers(-2**70, 2**70), doc_kind=st.sampled_from(["ok", "float", "bool", "short", "missing"]))
def test_every_entry_point_agrees(length, doc_kind):
    """One value is accepted everywhere or refused everywhere, with the same message."""
    doc = {"ok": DOC, "float": DOC.astype(float), "bool": DOC.astype(bool), "short": DOC[:-1]}.get(doc_kind)
    inputs = {"len": length} if doc is None else {"doc": doc, "len": length}
    got = [_refusal(e, inputs) for e in ENTRY_POINTS]
    ok = doc_kind == "ok" and 0 <= length <= N
    assert all((g is None) == ok for g in got), got
    if not ok:
        # The shape wording names the batch only for a call (which knows its B); the rest agrees.
        first = [g.splitlines()[0].split(" must ")[0] for g in got]
        assert len(set(first)) == 1, got


def test_cli_inputs_use_the_same_check():
    import argparse

    from attnlang.commands import spec_inputs

    got = spec_inputs(argparse.Namespace(inputs=["doc=8+8", "len=3"]), P)
    assert got["doc"].dtype == np.int64 and got["doc"].shape == (N,) and got["len"].shape == ()
    with pytest.raises(AttnError) as e:
        spec_inputs(argparse.Namespace(inputs=["doc=8+8"]), P)
    assert str(e.value) == str(pytest.raises(AttnError, check_inputs, P, {"doc": DOC}).value).replace(
        "inputs={'len': ...}", f"--input len={N}")
