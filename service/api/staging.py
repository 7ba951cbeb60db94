"""Staging folders (``DARE_UPLOAD_TMP_DIR/<job id>``): who owns one, and sweeping the orphans.

A request that stages an upload holds an exclusive ``flock`` on ``<folder>/.owner`` until it
is done with the folder. The kernel drops the lock when the process dies, however it dies, so a
folder whose lock can be taken has no live owner: it was left by a crash (``kill -9``, OOM) and
:func:`sweep` removes it. That needs no guess at how long an upload may take, and is safe with
several API processes (``dare api --workers N``) sharing one staging folder: each start-up sweep
removes only what no living process holds. The folder must be on a local disk (flock).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("dare.api")

OWNER_FILE = ".owner"
# A folder younger than this may be one whose request has created it and not locked it yet.
MIN_AGE_S = 60.0


class StagingLock:
    """Create ``folder`` and hold its owner lock until :meth:`release` (or the process dies)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._fd: int | None = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # a new folder: nobody else holds it

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None


def _owned(folder: Path) -> bool:
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock we may have taken
    return False


def sweep(root: Path, min_age_s: float = MIN_AGE_S) -> int:
    """Remove the entries of ``root`` that no living request owns; return how many."""
    if not root.is_dir():
        return 0
    removed = 0
    now = time.time()
    for entry in root.iterdir():
        try:
            if now - entry.lstat().st_mtime < min_age_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                if _owned(entry):
                    continue
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:  # its request removed it meanwhile
            continue
        except OSError as e:
            log.warning("cannot remove the staging leftover %s: %s", entry, e)
    if removed:
        log.info("removed %d orphaned staging folder(s) from %s", removed, root)
    return removed
