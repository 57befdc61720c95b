"""Reading ``.attn`` source: a path or a string to (text, display name), UTF-8 checked."""
from __future__ import annotations

import os
import pathlib

from attnlang.errors import AttnError, Diagnostic, Source, Span


def read_source(spec: str | os.PathLike) -> tuple[str, str]:
    """Source text and its display name for a path or a string (what ``attnlang.parse`` and the
    CLI read): a ``PathLike``, or a one-line ``str`` naming a file or ending in ``.attn``, is read
    from disk; any other ``str`` is the text itself, named ``<string>``."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and (
            spec.endswith(".attn") or os.path.isfile(spec))):
        path = pathlib.Path(spec)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AttnError(f"no such file: {spec}") from None
        except OSError as e:
            raise AttnError(f"cannot read {spec}: {e}") from None
        return decode_source(data, str(spec)), str(spec)
    return spec, "<string>"


def decode_source(data: bytes, name: str) -> str:
    """``.attn`` bytes as text (UTF-8, a byte order mark allowed); bytes that are not UTF-8 are
    an AttnError at their line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8-sig", errors="replace")
        before = data[:e.start].decode("utf-8-sig", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise AttnError(Diagnostic(f"byte 0x{data[e.start]:02x} is not valid UTF-8 text", Span(
            Source(name, text), line, col, line, col + 1), ".attn files are UTF-8 text")) from None
