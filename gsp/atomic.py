"""Atomic writes: a crash at any moment leaves either the old file or the new one, never half.

Every artifact the project writes goes through these helpers (temp file in the same folder,
fsync, then ``os.replace``), so readers never see a partial parquet, JSON or index.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path | str, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: Path | str, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Swap a fully built ``staging`` folder in for ``target``.

    Two renames (old → backup, staging → target) are the closest POSIX has to an atomic folder
    swap; a crash between them leaves the backup beside the target, which ``recover_dir`` puts back.
    """
    target = Path(target)
    backup = target.with_name(target.name + ".old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.replace(target, backup)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup)


def recover_dir(target: Path) -> None:
    """Undo an interrupted ``replace_dir_atomic``: restore the backup if the target is missing."""
    target = Path(target)
    backup = target.with_name(target.name + ".old")
    if not target.exists() and backup.exists():
        os.replace(backup, target)
