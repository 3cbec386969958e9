"""TensorRT-RTX's runtime cache for one engine, kept beside the engine on disk.

TensorRT-RTX builds an engine ahead of time without the user's GPU and compiles its kernels on that GPU when
the engine first runs (JIT), again in every new process. Its runtime cache (IRuntimeConfig.create_runtime_cache,
IRuntimeCache.serialize / deserialize; TensorRT-RTX's "Working with Runtime Cache") keeps the compiled kernels,
so the next ComfyUI session does not compile them again. Full TensorRT compiles every kernel at build time and
has no such cache. NOT RUN ANYWHERE YET: no GPU this project has had runs TensorRT-RTX (docs/building-engines.md).
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

from .atomic import write_atomically
from .scratch import Scratch

log = logging.getLogger(__name__)


SUFFIX = ".rtxcache"
HASH_CHARS = 12  # of the engine's sha256 in the cache's name


def runtime_cache_path(engine_path: str | Path, engine_sha256: str) -> Path:
    """Named by the engine's content: a rebuilt engine under the same name starts a new cache instead of
    reading kernels compiled for the old one."""
    engine_path = Path(engine_path)
    return engine_path.with_name(f"{engine_path.stem}.{engine_sha256[:HASH_CHARS]}{SUFFIX}")


class RuntimeCacheFile:
    def __init__(self, engine_path: str | Path, engine_sha256: str):
        self.path = runtime_cache_path(engine_path, engine_sha256)
        # this engine's caches from earlier builds: its name, then exactly a hash (not another engine's name; the
        # name escaped, so `kontext[1]` is not read as a pattern matching `kontext1`'s caches)
        self._any_build = f"{glob.escape(Path(engine_path).stem)}.{'[0-9a-f]' * HASH_CHARS}{SUFFIX}"
        self.config = self.cache = None
        self._saved_bytes = None  # size of what the file holds, once read or written here

    def runtime_config(self, engine):
        """An IRuntimeConfig for engine.create_execution_context(config) holding the cache, with the file's
        kernels loaded when the file was written for this GPU, driver and TensorRT-RTX (deserialize checks that
        itself and refuses the rest)."""
        # Both held here for as long as the backend: the cache must outlive the contexts made with it.
        self.config = config = engine.create_runtime_config()
        self.cache = config.create_runtime_cache()
        if self.path.is_file():
            blob = self.path.read_bytes()
            if self.cache.deserialize(blob):
                self._saved_bytes = len(blob)
                log.info("Kontext TRT: TensorRT-RTX kernels read from %s", self.path.name)
            else:
                log.info("Kontext TRT: %s was compiled for another GPU, driver or TensorRT-RTX; the kernels are "
                         "compiled again and the file replaced", self.path.name)
        if not config.set_runtime_cache(self.cache):
            log.warning("Kontext TRT: TensorRT-RTX did not take the runtime cache; its kernels will compile in every "
                        "session")
            self.cache = None
        return config

    def save(self) -> None:
        """Write the cache when it holds more than the file. A failed write costs the next session its compile
        time and nothing else, so it is logged, not raised."""
        if self.cache is None:
            return
        blob = memoryview(self.cache.serialize()).cast("B")
        if blob.nbytes == self._saved_bytes:
            return
        try:
            with Scratch(self.path.parent) as scratch:
                write_atomically(self.path, lambda tmp: tmp.write_bytes(blob), tmp_dir=scratch.path)
        except OSError as e:
            log.warning("Kontext TRT: could not write TensorRT-RTX's runtime cache %s (%s); its kernels will be "
                        "compiled again next session", self.path, e)
            return
        self._saved_bytes = blob.nbytes
        for stale in self.path.parent.glob(self._any_build):
            if stale != self.path:
                stale.unlink(missing_ok=True)
