"""Files that a reader never sees half-written, and JSON read with errors that name the file.

Every write goes to a temporary name in the destination folder (same filesystem, so the final
`os.replace` is an atomic rename), is flushed and fsynced, and is then renamed over the target. If
anything fails, Ctrl-C included, the temporary file is removed and the old target is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, the file
    written there replaces `path` with the mode a plain open() would give it (temporary files,
    and safetensors' own writes, are private: 0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, 0o666 & ~current_umask())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, newlines as written) to `path` atomically and return the path."""
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write `value` as indented JSON (non-ASCII kept, final newline) atomically."""
    return atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (non-ASCII kept) atomically; return the row count."""
    count = 0
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8", newline="\n") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False))
                stream.write("\n")
                count += 1
    return count


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
    """A JSON object from `path`; a missing file, invalid JSON or another top-level value raises
    `error` with a one-line message naming the file (and the line, for invalid JSON)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{path}:1: expected a JSON object at the top level")
    return value


# ------------------------------------------------------------------------------------------------
# Text that must be UTF-8
# ------------------------------------------------------------------------------------------------
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def wide_encoding(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" when a file's first bytes show it is in that encoding (a byte-order
    mark, or the NUL bytes of ASCII text stored two bytes per character), else None."""
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 4 and (head[1::2].count(0) == len(head[1::2]) or head[0::2].count(0) == len(head[0::2])):
        return "UTF-16"
    return None


def not_utf8_message(path: str | os.PathLike, encoding: str) -> str:
    return (f"{path}: the file is {encoding}, not UTF-8; save it as UTF-8 "
            f"(e.g. iconv -f {encoding} -t UTF-8 FILE > NEW_FILE)")


def check_utf8_file(path: str | os.PathLike, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the file when it is UTF-16 or UTF-32 text instead of UTF-8."""
    with open(path, "rb") as stream:
        encoding = wide_encoding(stream.read(4))
    if encoding is not None:
        raise error(not_utf8_message(path, encoding))


def utf8_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file; a UTF-16/32 file, or a line that is not
    UTF-8, raises `error` naming the file and the line."""
    check_utf8_file(path, error)
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark written by some editors
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the "
                            "line); save the file as UTF-8") from None


def read_utf8_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """The whole of a UTF-8 file, with the errors of `utf8_lines`."""
    return "".join(text for _, text in utf8_lines(path, error))
