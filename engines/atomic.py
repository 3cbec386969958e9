"""Atomic file writes: a crash or cancel never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], None], tmp_dir: str | Path | None = None) -> Path:
    """Call write(tmp) on a temporary file, fsync it, then rename it into place.

    tmp_dir: where the temporary file is made (a scratch.Scratch folder on the same file system, so a process
    killed mid-write leaves it where the next build removes it); beside `path` by default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=tmp_dir or path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
