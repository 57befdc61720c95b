"""`attnlang show` at large N: downsampled from the plan, never from a dense mask (issue 11,
item 13), and readable PNG axes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlang import Pattern, block, causal, sliding, window
from attnlang.commands import show


@settings(max_examples=30, deadline=None)
@given(st.integers(300, 3000), st.sampled_from([causal, causal & sliding(200) | block(300), window(700, 3)]),
       st.sampled_from([16, 32, 128, 512]))
def test_plan_map_equals_the_predicate_blocks(n, expr, cell):
    """Blocks from the plan (ragged N included) equal blocks classified pair by pair."""
    p = Pattern.create(expr, tokens=n)
    want = show._classify(p, 0, None, (0, n), (0, n), cell)
    assert np.array_equal(show._plan_map(p, 0, None, cell), want)


def test_million_tokens_evaluate_o_n_pairs(monkeypatch):
    """N = 10^6 with 16384-token blocks: the ragged last block used to be judged pair by pair
    (16384 x 10^6 predicate evaluations, 30 s and 6 GB); now at most 16 N pairs are."""
    n = 10 ** 6
    seen = []
    real = show._classify

    def counting(pattern, head, inputs, qs, ks, cell, content=None):
        seen.append((qs[1] - qs[0]) * (ks[1] - ks[0]))
        return real(pattern, head, inputs, qs, ks, cell, content)

    monkeypatch.setattr(show, "_classify", counting)
    p = Pattern.create(causal & sliding(4096), tokens=n)
    cell = show.cell_size(n, 64)
    m = show.cell_map(p, 0, None, cell)
    assert m.shape == (62, 62)
    assert (np.diag(m) == 1).all() and m[0, 1] == 0 and m[5, 0] == 0
    assert sum(seen) <= 2 * 16 * n
    n = 10 ** 6 + 3  # not a multiple of 16: the ragged tile row and column are judged per pair
    m = show.cell_map(Pattern.create(causal, tokens=n), 0, None, cell)
    assert (np.tril(m, -1)[1:, :] == 2).sum() == 61 * 62 // 2 and (np.diag(m) == 1).all()
    assert sum(seen) <= 2 * 2 * 16 * n


@pytest.mark.parametrize("x,label", [(0, "0"), (512, "512"), (80000, "80k"), (100000, "100k"),
                                     (1048576, "1M"), (1500000, "1.5M"), (12345, "12.3k")])
def test_tick_labels_are_short(x, label):
    assert show.tick_label(x) == label


def test_png_ticks_at_a_million(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    labels = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        save(fig, *a, **kw)  # draws: the tick labels exist now
        for ax in fig.axes:
            labels.append([t.get_text() for t in ax.get_xticklabels()])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    p = Pattern.create(causal, tokens=10 ** 6)
    show.write_png(p, [("", 0)], None, str(tmp_path / "c.png"))
    xs = [t for t in labels[0] if t]
    assert 2 <= len(xs) <= 6 and all(len(t) <= 5 for t in xs), xs
