"""Temporary files in an engine folder: each writer works inside a folder it owns, and a folder whose owner is
no longer running is removed by the next build or load.

A build writes its ONNX (22 GiB at full size), the engine and sidecar before their rename, and the calibrated
state inside `<folder>/.kontext_trt/scratch/<id>/`. Its owner holds an OS file lock on `scratch/<id>.lock`, taken
before the folder is made and given up after it is removed, and the OS drops that lock when the process ends
however it ends (an exception, SIGKILL, the OOM killer, a power cut): a folder whose lock can be taken, or that has
no lock file, has no owner left. The lock is filelock's (fcntl.flock on Linux and macOS, msvcrt.locking on
Windows; torch depends on it, so every ComfyUI has it): a process id would be reused, and a timestamp cannot tell
a slow build from a dead one.

The same folder holds the lock that keeps two builds of one request from both building (`request_lock`) and the
remembered engine hashes (`engine_store.verify_engine`).
"""
from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

BOOKKEEPING = ".kontext_trt"
# A lock file with no folder is left by an owner killed between taking its lock and making its folder, or one about
# to make it: it is removed once this old (it holds nothing; it is only tidied away).
ORPHAN_LOCK_AGE_S = 3600.0


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
        name = uuid.uuid4().hex
        self._lock = FileLock(str(base / f"{name}.lock"))
        self._lock.acquire(timeout=0)  # before the folder exists: no one can find it unowned
        self.path = base / name
        self.path.mkdir()
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()
        Path(self._lock.lock_file).unlink(missing_ok=True)


def remove_abandoned_scratch(folder: str | Path) -> list[Path]:
    """Remove the scratch folders in `folder` whose owner is no longer running; returns them."""
    base = bookkeeping_dir(folder, "scratch")
    if not base.is_dir():
        return []
    removed = []
    for entry in sorted(base.iterdir()):
        try:
            if entry.is_dir():
                scratch, lock_file = entry, entry.with_name(f"{entry.name}.lock")
            elif entry.suffix == ".lock" and not entry.with_suffix("").exists():
                if time.time() - entry.stat().st_mtime < ORPHAN_LOCK_AGE_S:
                    continue
                scratch, lock_file = None, entry
            else:
                continue
        except FileNotFoundError:
            continue  # removed meanwhile, with its folder, here or by another process's cleaner
        if lock_file.exists():
            lock = FileLock(str(lock_file))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its owner is running
            except OSError as e:  # a read-only models folder: nothing can be removed from it anyway
                log.debug("Kontext TRT: cannot check %s (%s)", lock_file, e)
                continue
            try:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
            finally:
                lock.release()
                lock_file.unlink(missing_ok=True)
        elif scratch is not None:  # the lock file goes only after the folder: its owner was stopped in between
            shutil.rmtree(scratch, ignore_errors=True)
        if scratch is not None:
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
