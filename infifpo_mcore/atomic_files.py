"""Files that a crash, of the process or of the machine, must never leave half-written: readers see the old version
or the whole new one. Written beside the final name (``<name>.tmp``), flushed to disk, renamed over it, and the
rename itself flushed (the directory entry)."""

from __future__ import annotations

import os
from pathlib import Path

STAGING_SUFFIX = ".tmp"


def fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Every file and folder under ``directory``, deepest first, then the directory itself."""
    for path in sorted(directory.rglob("*"), reverse=True):
        fsync(path)
    fsync(directory)


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replaces ``path`` with ``data`` (text as UTF-8) in one step."""
    staging = path.with_name(path.name + STAGING_SUFFIX)
    with open(staging, "wb") as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)
    fsync(path.parent)
