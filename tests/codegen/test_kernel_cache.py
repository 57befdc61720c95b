"""The Triton backend's on-disk kernel cache trusts nothing it finds (issue 11, item 3).

Fault injection on a cache entry (module ``NAME_DIGEST.py`` and its sidecar
``NAME_DIGEST.tables.bin``): an edited, truncated or garbage module, corrupted or stale tables,
and swapped pairs are each detected and rebuilt, and the next call equals the reference; when
rebuilding does not help, the call raises an AttnError naming the path. A vendored module
refuses a sidecar that is not its own. The "next process" is simulated by forgetting the
backend's in-memory module caches.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import importlib.util  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attnlang  # noqa: E402
from attnlang.codegen import module as codegen_module  # noqa: E402
from attnlang.errors import AttnError  # noqa: E402
from attnlang.runtime import triton as tb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N = 256
SPECS = {"a": f"pattern a {{ tokens n[{N}]\n attend causal & (block(8) | sink(2)) }}",
         "b": f"pattern b {{ tokens n[{N}]\n attend causal & (sliding(70) | keys(0..3)) }}"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory; every table goes to a sidecar file (as large plans do)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(codegen_module, "SIDECAR_BYTES", 0)
    _forget()
    yield tmp_path / "attnlang" / "kernels"
    _forget()


def _forget():
    """What a new process would have: no module imported yet."""
    for table in (tb._LOADED, tb._BY_PLAN, tb._PER_CALL, tb._TEXT):
        table.clear()


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, N, 16, generator=g) for _ in range(3)]


def _run(name):
    """``(triton output, reference output)`` of pattern ``name``; the entry files it uses."""
    q, k, v = _qkv()
    out = attnlang.compile(SPECS[name], backend="triton")(q, k, v)
    ref = attnlang.compile(SPECS[name], backend="reference")(q, k, v)
    return out, ref


def _entry(cache, name):
    (py,) = cache.glob(f"{name}_*.py")
    return py, py.with_suffix(".tables.bin")


def _assert_ok(name):
    out, ref = _run(name)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _fresh(cache, name):
    _assert_ok(name)
    py, tables = _entry(cache, name)
    assert tables.exists()
    return py, tables, py.read_bytes(), tables.read_bytes()


def _stale_tables(blob: bytes) -> bytes:
    """Tables of the same sizes and layout with other contents: every tile count set to 0."""
    raw = bytearray(zlib.decompress(blob))
    return zlib.compress(bytes(len(raw)), 6)


_EDIT = '''
_original_attention = attention


def attention(q, k, v, scale=None, return_lse=False, **kw):  # an edit that changes every result
    o, lse = _original_attention(q, k, v, scale=scale, return_lse=True, **kw)
    return (o * 0, lse) if return_lse else o * 0
'''


_EDIT_TABLES = '''
_original_attention_tables = attention_tables


def attention_tables(q, k, v, tables, scale=None, return_lse=False, **kw):
    o, lse = _original_attention_tables(q, k, v, tables, scale=scale, return_lse=True, **kw)
    return (o * 0, lse) if return_lse else o * 0
'''


@pytest.mark.parametrize("fault", ["edit", "truncate", "garbage", "empty"])
def test_damaged_module_is_rebuilt(cache, fault):
    py, _, good, _ = _fresh(cache, "a")
    damaged = {"edit": good + _EDIT.encode(), "truncate": good[:len(good) // 2],
               "garbage": os.urandom(2000), "empty": b""}[fault]
    py.write_bytes(damaged)
    _forget()
    _assert_ok("a")
    assert py.read_bytes() == good


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "stale", "missing"])
def test_damaged_tables_are_rebuilt(cache, fault):
    _, tables, _, blob = _fresh(cache, "a")
    if fault == "missing":
        tables.unlink()
    else:
        mid = len(blob) // 2
        tables.write_bytes({"corrupt": blob[:mid] + bytes(b ^ 0x5A for b in blob[mid:mid + 16]) + blob[mid + 16:],
                            "truncate": blob[:mid], "stale": _stale_tables(blob)}[fault])
    _forget()
    _assert_ok("a")
    assert tables.read_bytes() == blob


def test_swapped_pairs_are_rebuilt(cache):
    _, ta, _, blob_a = _fresh(cache, "a")
    _, tb_, _, blob_b = _fresh(cache, "b")
    assert blob_a != blob_b
    ta.write_bytes(blob_b)
    tb_.write_bytes(blob_a)
    _forget()
    _assert_ok("a")
    _assert_ok("b")
    assert ta.read_bytes() == blob_a and tb_.read_bytes() == blob_b


def test_an_entry_that_stays_damaged_raises_an_attn_error_naming_the_path(cache, monkeypatch):
    py, _, good, _ = _fresh(cache, "a")
    py.write_bytes(good[:100])
    _forget()
    # A disk that keeps damaging what is written: the rebuild cannot help.
    monkeypatch.setattr(tb, "_atomic_write", lambda path, data: path.write_bytes(data[:100]))
    with pytest.raises(AttnError) as e:
        _run("a")
    assert str(py) in str(e.value) and "damaged" in str(e.value)


def test_an_edit_after_loading_never_reaches_triton(cache):
    """Triton reads kernel source back through linecache: it must see the verified text."""
    import linecache

    py, _, good, _ = _fresh(cache, "a")
    py.write_bytes(good.replace(b"def _attn_fwd", b"def _attn_fwd_edited"))
    linecache.checkcache(str(py))
    assert "".join(linecache.getlines(str(py))).encode() == good


def test_vendored_module_refuses_tables_that_are_not_its_own(cache, tmp_path):
    _fresh(cache, "a")
    _fresh(cache, "b")
    (py_a, _), (_, tables_b) = _entry(cache, "a"), _entry(cache, "b")
    out = tmp_path / "vendored"
    out.mkdir()
    (out / "a.py").write_bytes(py_a.read_bytes())
    for blob in (tables_b.read_bytes(), _stale_tables(tables_b.read_bytes()), b"not zlib"):
        (out / "a.tables.bin").write_bytes(blob)
        spec = importlib.util.spec_from_file_location("vendored_a", out / "a.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["vendored_a"] = mod
        try:
            spec.loader.exec_module(mod)
            with pytest.raises(RuntimeError, match=r"a\.tables\.bin does not match a\.py"):
                mod._host_tables()
        finally:
            sys.modules.pop("vendored_a", None)


def test_damaged_per_call_module_is_rebuilt(cache):
    """Runtime-input patterns load per-call-tables modules through the same checked path."""
    src = f"pattern d {{ tokens n[{N}]\n input doc: ids[{N}]\n attend causal & same(doc) }}"
    q, k, v = _qkv()
    doc = torch.arange(N) // 40
    ref = attnlang.compile(src, backend="reference")(q, k, v, doc=doc)
    fn = attnlang.compile(src, backend="triton")
    torch.testing.assert_close(fn(q, k, v, doc=doc), ref, atol=1e-5, rtol=1e-5)
    (py,) = cache.glob("d_*.py")
    good = py.read_bytes()
    py.write_bytes(good + _EDIT_TABLES.encode())
    _forget()
    torch.testing.assert_close(fn(q, k, v, doc=doc), ref, atol=1e-5, rtol=1e-5)
    assert py.read_bytes() == good
