"""Allowed pairs are counted in one place (attnlang.pairs): every source it may take (the
planner's count, the sympy closed form, the plan's tiles) gives the dense mask's count."""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given

from attnlang import make_plan
from attnlang.closed_form import derive
from attnlang.pairs import _from_tiles, allowed_pairs
from attnlang.pattern import Pattern, causal, same
from strategies import patterns


@given(patterns(max_n=256, max_leaves=4))
def test_every_source_gives_the_masks_count(p):
    want = int(p.mask()[0].sum())
    plan = make_plan(p)
    g = plan.groups[0]
    assert allowed_pairs(plan, g) == want
    if plan.allowed_pairs is not None:
        assert plan.allowed_pairs[0] == want
    cf = derive(p)
    if cf is not None:
        assert cf.count() == want
    assert _from_tiles(plan, g, None, None) == want


def test_inputs_are_counted_from_the_tiles():
    p = Pattern.create(causal & same("doc"), 64, inputs={"doc": "ids"})
    doc = np.repeat([0, 1, 2], [10, 30, 24])
    plan = dataclasses.replace(make_plan(p, inputs={"doc": doc}), allowed_pairs=None)
    assert allowed_pairs(plan, plan.groups[0], {"doc": doc}) == int(p.mask(inputs={"doc": doc})[0].sum())
