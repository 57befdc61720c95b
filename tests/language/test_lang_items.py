"""Issue 11, items 10, 11 and 14: schedules checked at the line, a formatter that keeps comments,
and the rough edges of the CLI and the builders a new user hit. Each test failed before its fix."""
from __future__ import annotations

import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlang
from attnlang.errors import AttnError
from attnlang.grammar import load

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))


def main(capsys, *args) -> tuple[int, str, str]:
    from attnlang.cli import main as cli_main

    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "internal error" not in err and "Traceback" not in err, err
    return rc, out, err


def check_error(text: str) -> AttnError:
    with pytest.raises(AttnError) as e:
        load(text, "f.attn", strict=False).check()
    return e.value


# --- item 10: schedules are checked by `check`, at the line ---------------------------------

STA = """pattern sta(T = 18, H = 48, W = 80) {
    tokens t[T], h[H], w[W]
    attend neighborhood(window = (18, 24, 24), stride = (6, 8, 8))
    schedule tile(q = TILE, kv = TILE)
}
"""


@pytest.mark.parametrize("tile, col, words", [
    ("(6, 8, 8)", 23, ["tile q = (6, 8, 8) holds 384 tokens", "power of two in 16..256", "e.g. (4, 8, 8)"]),
    ("1", 23, ["tile q = 1 is not a supported tile size", "16, 32, 64, 128, 256"]),
    ("3", 23, ["tile q = 3 is not a supported tile size"]),
    ("512", 23, ["tile q = 512 is not a supported tile size"]),
])
def test_bad_tiles_fail_check_at_the_line(tile, col, words):
    err = check_error(STA.replace("TILE", tile))
    first = err.diagnostics[0]
    assert (first.span.line, first.span.col) == (4, col)
    for w in words:
        assert w in str(err)


def test_boxes_that_do_not_nest_fail_check():
    text = STA.replace("tile(q = TILE, kv = TILE)", "tile(q = (2, 8, 8), kv = (4, 4, 8))")
    err = check_error(text)
    assert "do not nest" in str(err) and str(err).startswith("f.attn:4:5:")


@settings(max_examples=40)
@given(st.tuples(st.integers(1, 8), st.integers(1, 16), st.integers(1, 16)))
def test_check_accepts_a_tile_box_iff_the_planner_does(box):
    """The rule at the line is the planner's: whatever check accepts plans, and the rest fails."""
    text = (f"pattern p {{\n    tokens t[8], h[16], w[16]\n    attend neighborhood(window = 3)\n"
            f"    schedule tile(q = {box}, kv = {box})\n}}\n")
    try:
        p = load(text).instantiate()
    except AttnError as e:
        assert "tile box must hold a power of two" in str(e)
        from attnlang.pattern import Pattern
        built = Pattern.create(attnlang.neighborhood(window=3), tokens={"t": 8, "h": 16, "w": 16}, tile_q=box,
                               tile_kv=box)
        with pytest.raises(AttnError):
            attnlang.make_plan(built)
    else:
        plan = attnlang.make_plan(p)
        assert plan.block_m == box[0] * box[1] * box[2]


def test_block_m_flag_names_the_flag(capsys):
    rc, _, err = main(capsys, "plan", ROOT / "examples/swa.attn", "--block-m", "384")
    assert rc == 1 and "--block-m 384 is not a supported tile size" in err


# --- item 11: fmt keeps comments ------------------------------------------------------------

COMMENTS = re.compile(r"#[^\n]*")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_fmt_keeps_every_comment_and_is_idempotent_on_examples(path):
    text = path.read_text(encoding="utf-8")
    m = attnlang.parse(path)
    out = m.format()
    assert [c.rstrip() for c in COMMENTS.findall(text)] == COMMENTS.findall(out)
    assert load(out) == m
    assert load(out).format() == out
    assert out == text  # the shipped examples are canonical: `fmt --check examples/*.attn` passes


MESSY = """# header

# more header
let A = 1   # aligned
let B = 22  # aligned
# before C
let C = [1,   # one
   2]  # two
def m(x) =   causal & sliding(x)     # macro
pattern p(N = 8,  # param
          W = 2) {   # header
  # first statement
  tokens n[N]        # tokens
  attend by head {   # by head
     # branch
     0..1: causal    # c0
     # before close
  }   # close by head
  heads 1
  # end of body
}  # close
# end of file
"""


def test_fmt_places_comments():
    out = load(MESSY).format()
    assert out == """# header

# more header
let A = 1   # aligned
let B = 22  # aligned
# before C
# one
let C = [1, 2]  # two

def m(x) = causal & sliding(x)       # macro

# param
pattern p(N = 8, W = 2) {  # header
    # first statement
    tokens n[N]      # tokens
    attend by head {  # by head
        # branch
        0..1: causal  # c0
        # before close
    }  # close by head
    heads 1
    # end of body
}  # close
# end of file
"""
    assert load(out).format() == out


@st.composite
def commented(draw):
    """A file with a comment at the end of any of its lines and on new lines anywhere."""
    lines = draw(st.sampled_from(EXAMPLES)).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if draw(st.booleans()) and line.strip() and not line.lstrip().startswith("#"):
            line = line + " " * draw(st.integers(1, 30)) + f"# c{i}"
        out.append(line)
        if draw(st.integers(0, 5)) == 0:
            out.append(" " * draw(st.integers(0, 8)) + f"# own {i}")
    return "\n".join(out) + "\n"


@settings(max_examples=30)
@given(commented())
def test_fmt_keeps_comments_and_meaning_and_is_idempotent(text):
    m = load(text)
    out = m.format()
    assert sorted(COMMENTS.findall(out)) == sorted(c.rstrip() for c in COMMENTS.findall(text))
    assert load(out) == m and load(out).format() == out


def test_fmt_several_files_and_check(capsys, tmp_path):
    rc, out, _ = main(capsys, "fmt", ROOT / "examples/swa.attn", ROOT / "examples/swin.attn")
    assert rc == 0 and out.count("pattern swin(") == 1 and out.count("pattern swa(") == 1
    rc, _, err = main(capsys, "fmt", "--check", *EXAMPLES)
    assert rc == 0, err
    f = tmp_path / "x.attn"
    f.write_text(MESSY)
    rc, _, err = main(capsys, "fmt", "--write", f)
    assert rc == 0 and f.read_text() == load(MESSY).format()


# --- item 14: smaller rough edges -----------------------------------------------------------

def test_empty_file_is_valid_and_both_commands_say_so(capsys, tmp_path):
    empty = tmp_path / "empty.attn"
    empty.write_text("")
    rc, out, _ = main(capsys, "check", empty)
    assert rc == 0 and out.strip() == f"1 file, 0 patterns ok ({empty} defines no pattern)"
    lib = tmp_path / "lib.attn"
    lib.write_text("def local(r) = causal & sliding(r)\n")
    for cmd in ("show", "plan", "simulate"):
        rc, _, err = main(capsys, cmd, lib)
        assert rc == 1 and f"{lib} defines no pattern: nothing to {cmd}" in err
        assert "`attnlang check` accepts it" in err


def test_bom_is_accepted(capsys, tmp_path):
    f = tmp_path / "bom.attn"
    f.write_bytes(b"\xef\xbb\xbfpattern p {\n    tokens n[8]\n    attend causal\n}\n")
    assert main(capsys, "check", f)[0] == 0
    assert main(capsys, "show", f)[0] == 0
    assert attnlang.parse(f).names == ["p"]
    assert load("\ufeffpattern p {\n    tokens n[8]\n    attend causal\n}\n").names == ["p"]


def test_invalid_utf8_is_a_located_error(capsys, tmp_path):
    f = tmp_path / "bad.attn"
    f.write_bytes(b"pattern p {\n    tokens n[8]  # caf\xe9\n    attend causal\n}\n")
    rc, _, err = main(capsys, "check", f)
    assert rc == 1 and f"{f}:2:23: byte 0xe9 is not valid UTF-8 text" in err
    with pytest.raises(AttnError, match="2:23"):
        attnlang.parse(f)


def test_set_takes_sizes_with_units(capsys):
    rc, out, err = main(capsys, "plan", ROOT / "examples/swa.attn", "--set", "N=4k", "--set", "W=1k")
    assert rc == 0, err
    assert out.startswith("plan swa: N = 4096,")
    from attnlang.commands import parse_value
    assert (parse_value("4k"), parse_value("1M"), parse_value("2K")) == (4096, 1 << 20, 2048)


def test_cli_names_the_p_flag(capsys):
    rc, _, err = main(capsys, "show", ROOT / "examples/swin.attn")
    assert rc == 1 and "defines 2 patterns; choose one with -p NAME" in err and "swin_shifted" in err
    with pytest.raises(AttnError, match="pattern=NAME"):  # the Python API keeps its own words
        attnlang.resolve(ROOT / "examples/swin.attn")


@pytest.mark.parametrize("call, words", [
    (lambda: attnlang.sliding("64"), "sliding r = '64' is a string"),
    (lambda: attnlang.sliding(-64), "sliding r = -64 is negative"),
    (lambda: attnlang.sliding(2.5), "sliding r = 2.5 is a float"),
    (lambda: attnlang.window(before=-1), "window before = -1 is negative"),
    (lambda: attnlang.window(after="x"), "window after = 'x' is a string"),
])
def test_builders_name_what_the_user_wrote(call, words):
    with pytest.raises(AttnError) as e:
        call()
    assert words in str(e.value)


def test_sliding_negative_in_attn_says_sliding():
    err = check_error("pattern p {\n    tokens n[8]\n    attend sliding(-64)\n}\n")
    assert str(err).startswith("f.attn:3:20: sliding r must be a non-negative integer or inf, got integer -64")
    assert "window before" not in str(err)


def test_cli_md_counts_are_current(capsys):
    """docs/cli.md shows `attnlang check examples/*.attn`: its counts must be today's."""
    doc = (ROOT / "docs/cli.md").read_text()
    shown = re.search(r"\$ attnlang check examples/\*\.attn\n(.*)\n", doc).group(1)
    rc, out, _ = main(capsys, "check", *EXAMPLES)
    assert rc == 0 and out.strip() == shown


def test_plan_counts_per_head_and_simulate_counts_all_heads(capsys):
    duo = ROOT / "examples/duo_heads.attn"
    rc, out, _ = main(capsys, "plan", duo, "--set", "N=1024")
    assert rc == 0 and "each of heads 0..8: visited 136 of 256 tiles" in out
    rc, out, _ = main(capsys, "simulate", duo, "--set", "N=1024")
    first, second = out.splitlines()[:2]
    assert first.endswith("batch 1, 32 query heads") and "H = " not in first
    assert "visited 3032 of 8192 tiles" in second and second.endswith("all 32 heads together")


def test_caret_is_on_the_lexer_line_with_form_feeds():
    """Lines end at \\n as the lexer counts them (str.splitlines also split at \\f)."""
    with pytest.raises(AttnError) as e:
        load("let a = 1\x0c\nlet b = slidng\n", "x.attn")
    assert str(e.value).splitlines()[1] == "    let b = slidng"
