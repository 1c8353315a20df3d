"""Atomic file writes: a reader never sees a half-written output.

Everything is first written to a temporary file in the destination folder (same filesystem, so
the final `os.replace` is an atomic rename), flushed and fsynced, then renamed over the target.
If anything fails the temporary file is removed and the old target, if any, is left untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _write_atomically(path: str | os.PathLike, fill: Callable[[TextIO], None]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            fill(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(temp_name, 0o666 & ~_current_umask())
        os.replace(temp_name, target)
    except BaseException:
        # Leave no stray temporary file behind, whatever went wrong (including Ctrl-C).
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically and return the path."""
    return _write_atomically(path, lambda stream: stream.write(text))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is) atomically; return the row count."""
    count = 0

    def fill(stream: TextIO) -> None:
        nonlocal count
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False))
            stream.write("\n")
            count += 1

    _write_atomically(path, fill)
    return count


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write `value` as indented JSON (with a final newline) atomically."""
    return atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")
