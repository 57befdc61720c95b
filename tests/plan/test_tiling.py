"""Per-primitive exactness of tile classes, orders and the three-valued logic."""
import itertools

import numpy as np
import pytest

from attnlang import (
    Pattern, axial, block, causal, full, global_, grid, halo, keys, neighborhood, queries, random,
    sink, sliding, strided, window,
)
from attnlang.order import Ordering, _interval_boxes
from attnlang.pattern import Layout
from attnlang.plan import Plan
from attnlang.planner import make_plan
from attnlang.tiling import EMPTY, FULL, PARTIAL, UNKNOWN, and3, not3, or3

LAYOUTS = [(200,), (12, 20), (4, 6, 10)]


def prims(layout):
    n = Layout.of(layout).n
    rank = len(layout)
    names = Layout.of(layout).names
    out = [causal, sliding(7), window(3, 20), keys(range(5, 40)), queries([0, 3, n - 1]),
           global_(range(0, 4)), sink(3), random(block=16, count=2, seed=3),
           neighborhood(window=3), neighborhood(window=2, dilation=2, stride=2, causal=True),
           block(4, shift=1), strided(3), halo(block=4, halo=1), causal(names[-1]), axial(names[0]),
           grid(tuple(s // 2 for s in layout))]
    return out


CASES = [(layout, i) for layout in LAYOUTS for i in range(len(prims(layout)))]


def _oracle_equal(p, **kw):
    plan = make_plan(p, **kw)
    ref = Plan.from_mask(p, p.mask(), plan.block_m, plan.block_n, plan.order)
    mine, theirs = plan.tile_map(), ref.tile_map()
    # Exact: no empty tile visited, no full tile marked partial, nothing missed.
    assert np.array_equal(mine, theirs), (p.to_attn(), kw)


@pytest.mark.parametrize("layout,i", CASES)
@pytest.mark.parametrize("order", ["natural", "tiled", "hilbert"])
def test_primitive_exact(layout, i, order):
    e = prims(layout)[i]
    p = Pattern.create(e, tokens=layout)
    _oracle_equal(p, order=order, block_m=16, block_n=32)
    # and combined with another primitive through each operator
    other = prims(layout)[(i + 5) % len(prims(layout))]
    for combo in (e & other, e | other, e - other, ~e):
        _oracle_equal(Pattern.create(combo, tokens=layout), order=order, block_m=32, block_n=16)


@pytest.mark.parametrize("box", [(2, 8), (4, 4), (1, 16)])
def test_explicit_boxes(box):
    p = Pattern.create(neighborhood(window=(3, 5), dilation=(1, 2)) & causal("h"), tokens=(12, 20),
                       tile_q=box, tile_kv=box)
    _oracle_equal(p)


def test_three_valued_logic():
    vals = [EMPTY, PARTIAL, FULL]
    for a, b in itertools.product(vals, vals):
        x, y = np.array([a]), np.array([b])
        got_and, got_or = and3([x, y])[0], or3([x, y])[0]
        if a == PARTIAL and b == PARTIAL:
            assert got_and == UNKNOWN and got_or == UNKNOWN
        else:
            assert got_and == (EMPTY if EMPTY in (a, b) else FULL if a == b == FULL else PARTIAL)
            assert got_or == (FULL if FULL in (a, b) else EMPTY if a == b == EMPTY else PARTIAL)
    assert list(not3(np.array([EMPTY, PARTIAL, FULL, UNKNOWN]))) == [FULL, PARTIAL, EMPTY, UNKNOWN]


@pytest.mark.parametrize("sizes", [(5, 7), (3, 4, 6)])
def test_interval_boxes_partition(sizes):
    n = int(np.prod(sizes))
    for s in range(0, n, 3):
        for e in range(s, n, 5):
            got = set()
            boxes = _interval_boxes(s, e, sizes)
            assert len(boxes) <= 2 * len(sizes) - 1
            for lo, hi in boxes:
                for c in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
                    got.add(int(np.ravel_multi_index(c, sizes)))
            assert got == set(range(s, e + 1))


@pytest.mark.parametrize("name", ["tiled", "morton", "hilbert"])
def test_box_orders_are_permutations(name):
    layout = Layout.of((5, 12, 10))
    o = Ordering.boxed(layout, (2, 4, 4), (2, 4, 8), dil=(1, 2, 1), name=name)
    pos = o.positions()
    assert sorted(pos[pos >= 0].tolist()) == list(range(layout.n))
    assert len(pos) % 128 == 0


def test_hilbert_is_a_continuous_walk():
    o = Ordering.boxed(Layout.of((32, 32)), (4, 4), (4, 4), name="hilbert")
    coords = np.stack(np.unravel_index(o.seq, (8, 8)), 1)
    assert (np.abs(np.diff(coords, axis=0)).sum(1) == 1).all()
