"""Staging folders of bundle writers, and the removal of those an interrupted writer left.

Export writes a bundle into ``.<name>.partial-*`` beside it and quantize writes its
graphs into ``.quantize-*`` inside the bundle, then each commits with a rename. A
writer killed before the rename (SIGKILL, power loss) leaves its folder behind;
the next writer of the same kind removes it when it starts.

A folder is removed only when it is certainly abandoned, since two writers may run
at once (two exports into one parent folder):

- its owner file names a process on this machine that no longer runs; or
- its owner process still runs but the folder is older than :data:`MAX_AGE_SECONDS`
  (the process id was reused: no writer runs for a week); or
- it has no readable owner file, or one written on another machine (a shared
  disk, where the process cannot be checked), and is older than
  :data:`GRACE_SECONDS`. The owner file is written right after the folder is made,
  so only a writer killed in that instant, or one from another host, lacks it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["OWNER_FILE", "GRACE_SECONDS", "MAX_AGE_SECONDS", "make_staging", "release", "remove_abandoned"]

OWNER_FILE = ".staging-owner.json"
GRACE_SECONDS = 3600.0
MAX_AGE_SECONDS = 7 * 24 * 3600.0


def make_staging(parent: str | os.PathLike[str], prefix: str) -> Path:
    """Remove abandoned ``prefix*`` folders in ``parent``, then make a new one owned by this process."""
    parent = Path(parent)
    remove_abandoned(parent, prefix)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
    (staging / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return staging


def release(staging: str | os.PathLike[str]) -> None:
    """Drop the owner file before ``staging`` is committed (renamed into place)."""
    (Path(staging) / OWNER_FILE).unlink(missing_ok=True)


def remove_abandoned(parent: str | os.PathLike[str], prefix: str, now: float | None = None) -> list[Path]:
    """Remove the ``prefix*`` folders in ``parent`` whose writer is gone; returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue  # not something a writer made; never follow a link out
        if _abandoned(folder, now):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def _abandoned(folder: Path, now: float) -> bool:
    try:
        age = now - folder.stat().st_mtime
    except OSError:
        return False
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return age > GRACE_SECONDS
    if host != socket.gethostname():
        return age > GRACE_SECONDS
    return not _running(pid) or age > MAX_AGE_SECONDS


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True
