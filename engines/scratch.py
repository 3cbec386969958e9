"""Temporary files in an engine folder: each writer works inside a folder it owns, and a folder whose owner is
no longer running is removed by the next build or load.

A build writes its ONNX (22 GiB at full size), the engine and sidecar before their rename, and the calibrated
state inside `<folder>/.kontext_trt/scratch/<id>/`. Its owner holds an OS file lock on `<id>/owner.lock` while it
works there, and the OS drops that lock when the process ends however it ends (an exception, SIGKILL, the OOM
killer, a power cut), so a folder whose lock can be taken has no owner left. The lock is filelock's (fcntl.flock on
Linux and macOS, msvcrt.locking on Windows; torch depends on it, so every ComfyUI has it): a process id would be
reused, and a timestamp cannot tell a slow build from a dead one.

The same folder holds the lock that keeps two builds of one request from both building (`request_lock`) and the
remembered engine hashes (`engine_store.verify_engine`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

BOOKKEEPING = ".kontext_trt"
OWNER_LOCK = "owner.lock"
# A scratch folder is created, then its lock taken, microseconds apart; one with no lock file that is older than
# this was left by a process killed in between.
UNLOCKED_GRACE_S = 60.0


def bookkeeping_dir(folder: str | Path, kind: str) -> Path:
    return Path(folder) / BOOKKEEPING / kind


class Scratch:
    """`with Scratch(folder) as scratch:` a private temporary folder `scratch.path` inside `folder` (so files move
    out of it into `folder` by a rename), removed with everything in it when the block ends."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path: Path | None = None
        self._lock: FileLock | None = None

    def __enter__(self) -> Scratch:
        base = bookkeeping_dir(self.folder, "scratch")
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=base))
        self._lock = FileLock(str(self.path / OWNER_LOCK))
        self._lock.acquire(timeout=0)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
        shutil.rmtree(self.path, ignore_errors=True)


def remove_abandoned_scratch(folder: str | Path) -> list[Path]:
    """Remove the scratch folders in `folder` whose owner is no longer running; returns them."""
    base = bookkeeping_dir(folder, "scratch")
    if not base.is_dir():
        return []
    removed = []
    for scratch in base.iterdir():
        if not scratch.is_dir():
            continue
        lock_file = scratch / OWNER_LOCK
        if not lock_file.is_file():
            if time.time() - scratch.stat().st_mtime < UNLOCKED_GRACE_S:
                continue  # its owner may be about to take the lock
        else:
            lock = FileLock(str(lock_file))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its owner is running
            except OSError as e:  # a read-only models folder: nothing can be removed from it anyway
                log.debug("Kontext TRT: cannot check %s (%s)", scratch, e)
                continue
            lock.release()
        shutil.rmtree(scratch, ignore_errors=True)
        removed.append(scratch)
    if removed:
        log.info("Kontext TRT: removed %d temporary folder(s) left in %s by builds that are no longer running",
                 len(removed), folder)
    return removed


def request_lock(folder: str | Path, name: str) -> FileLock:
    """The lock one request's build holds from its cache lookup to its engine's rename (named after the request's
    engine). The lock files stay: removing a lock file while another process waits on it would let a third
    take a new one beside it."""
    base = bookkeeping_dir(folder, "locks")
    base.mkdir(parents=True, exist_ok=True)
    return FileLock(str(base / f"{name}.lock"))
