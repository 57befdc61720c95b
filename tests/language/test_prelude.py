"""The prelude std.attn: every macro expands, checks, and means what its paper says."""
import re
from importlib import resources

import numpy as np
import pytest

from attnlang import Pattern, axial, block, causal, global_, grid, halo, keys, neighborhood, random, sliding
from attnlang.grammar import load, load_prelude

PAPER_MACROS = ["longformer", "bigbird", "swa", "prefix_lm", "streaming", "natten", "swin",
                "maxvit_block", "maxvit_grid", "axial_video"]


def mask_of(attend: str, tokens: str) -> np.ndarray:
    return load(f"pattern p {{\n    tokens {tokens}\n    attend {attend}\n}}\n").instantiate().mask()


def same_mask(attend: str, tokens: str, expr, layout) -> bool:
    return np.array_equal(mask_of(attend, tokens), Pattern.create(expr, layout).mask())


CASES = [
    ("swa(8)", "n[64]", causal & sliding(8), 64),
    ("longformer(r = 4, g = 2)", "n[64]", sliding(4) | global_(0, 2), 64),
    ("bigbird(block = 4, r = 2, seed = 3)", "n[64]",
     halo(4, 4) | global_(0, 8) | random(4, 2, 3), 64),
    ("prefix_lm(5)", "n[32]", causal | (keys(0, 5)), 32),
    ("streaming(sink = 2, r = 6)", "n[64]", causal & (sliding(6) | keys(0, 2)), 64),
    ("natten(window = 3, dilation = 2)", "h[12], w[12]", neighborhood(3, 2), (12, 12)),
    ("natten(window = (3, 5), causal = (true, false))", "h[12], w[12]",
     neighborhood((3, 5), causal=(True, False)), (12, 12)),
    ("swin(size = 4, shift = 2)", "h[8], w[8]", block(4, 2), (8, 8)),
    ("maxvit_block(4)", "h[8], w[8]", block(4), (8, 8)),
    ("maxvit_grid(2)", "h[8], w[8]", grid(2), (8, 8)),
    ("axial_video", "t[3], h[4], w[4]", axial("t") | axial("h") | axial("w"), {"t": 3, "h": 4, "w": 4}),
    ("halo(block = 4, halo = 1)", "h[8], w[8]", halo(4, 1), (8, 8)),
]


@pytest.mark.parametrize("attend, tokens, expr, layout", CASES, ids=[c[0] for c in CASES])
def test_macro_means_the_paper_pattern(attend, tokens, expr, layout):
    assert same_mask(attend, tokens, expr, layout)


def test_published_defaults_check_on_paper_sizes():
    for attend, tokens in [("swa", "n[8192]"), ("longformer", "n[4096]"), ("bigbird", "n[4096]"),
                           ("streaming", "n[4096]"), ("natten", "h[56], w[56]"), ("swin", "h[56], w[56]"),
                           ("swin(shift = 3)", "h[56], w[56]"), ("maxvit_block", "h[56], w[56]"),
                           ("maxvit_grid", "h[56], w[56]"), ("axial_video", "t[8], h[16], w[16]"),
                           ("prefix_lm(128)", "n[1024]")]:
        load(f"pattern p {{\n    tokens {tokens}\n    attend {attend}\n}}\n").check()


def test_swa_is_causal_sliding():
    m = mask_of("swa(3)", "n[16]")[0]
    i, j = np.indices(m.shape)
    assert np.array_equal(m, (j <= i) & (i - j <= 3))


def test_every_paper_macro_has_a_citation_comment():
    prelude = load_prelude()
    assert set(PAPER_MACROS) <= set(prelude.macros)
    text = resources.files("attnlang").joinpath("std.attn").read_text()
    for name in PAPER_MACROS:
        block_ = text.split(f"def {name}")[0].rsplit("\n\n", 1)[-1]
        assert block_.startswith("#") and re.search(r"(19|20)\d\d", block_), name
        assert "published" in block_.lower(), name
    assert "halo(block = 8, halo = 3)" in text  # HaloNet is the primitive, documented


def test_prelude_is_shadowable_and_cached():
    assert load_prelude() is load_prelude()
    m = load("def swa(r) = sliding(r)\npattern p {\n    tokens n[16]\n    attend swa(2)\n}\n")
    assert m.instantiate().attend == sliding(2)


def test_prelude_formats_back_to_itself():
    prelude = load_prelude()
    assert load(prelude.format()).macros == prelude.macros
