"""Atomic file writes that concurrent processes cannot trip over.

Every cache or state file dabench writes goes through a temporary file with
a name unique to the writing process and call, then ``os.replace`` onto the
final name: a reader sees the old file or the new one, never half of one,
and two processes writing the same entry at once both succeed (the last
rename wins; both wrote the same content).  A shared temporary name would
let one writer rename the other's half-written file away.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "unique_tmp"]


def unique_tmp(path: str | os.PathLike) -> Path:
    """A hidden temporary name next to ``path``, unique to this process and
    call, keeping the suffix (``np.savez`` appends ``.npz`` otherwise)."""
    p = Path(path)
    return p.with_name(f".{p.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{p.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``
    atomically, on failure it is removed."""
    tmp = unique_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
