"""TensorRT-RTX's runtime cache beside an engine, without a GPU: the engine, its runtime config and cache are
stand-ins answering as TensorRT-RTX's Python API documents them (deserialize -> False for a cache from another
GPU, driver or version)."""
import hashlib
from types import SimpleNamespace

import pytest
from store_helpers import store_files

from engines.config import tiny_config
from engines.runtime_tensorrt import TensorRTBackend
from engines.shape_profiles import named_profile
from engines.tensorrt_runtime_cache import runtime_cache_path

ENGINE = b"engine"
SHA = hashlib.sha256(ENGINE).hexdigest()  # the backend checks the engine file against its sidecar's hash


class Cache:
    def __init__(self, compatible: bool):
        self.compatible, self.kernels = compatible, b""

    def deserialize(self, blob) -> bool:
        if not self.compatible:
            return False
        self.kernels = bytes(blob)
        return True

    def serialize(self):
        return self.kernels


class Engine:
    """ICudaEngine's calls the backend makes; `compiles` stands for the kernels TensorRT-RTX compiles as it runs."""

    def __init__(self, compatible: bool):
        self.compatible, self.cache, self.context_config = compatible, None, "not created"

    def create_runtime_config(self):
        engine = self

        class Config:
            def create_runtime_cache(self):
                return Cache(engine.compatible)

            def set_runtime_cache(self, cache):
                engine.cache = cache
                return True
        return Config()

    def create_execution_context(self, config=None):
        self.context_config = config
        return object()

    def compiles(self, kernels: bytes):
        self.cache.kernels += kernels


def backend(engine_path, flavour="tensorrt_rtx", compatible=True) -> tuple[TensorRTBackend, Engine]:
    engine = Engine(compatible)
    runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                   "deserialize_cuda_engine": lambda self, buffer: engine})
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt = SimpleNamespace(module=SimpleNamespace(Logger=logger, Runtime=runtime), flavour=flavour)
    meta = {"profiles": [named_profile("kontext_1ref").__dict__], "engine_sha256": SHA, "engine_bytes": len(ENGINE),
            "io": {name: {"dtype": "HALF"} for name in ("img", "out")}}
    b = TensorRTBackend(engine_path, meta, trt, tiny_config())
    b._ensure_loaded()
    return b, engine


@pytest.fixture
def engine_path(tmp_path):
    path = tmp_path / "kontext_fp8.engine"
    path.write_bytes(ENGINE)
    return path


def test_compiled_kernels_are_kept_for_the_next_session(engine_path):
    cache_file = runtime_cache_path(engine_path, SHA)
    assert cache_file.name == f"kontext_fp8.{SHA[:12]}.rtxcache"
    earlier_build = runtime_cache_path(engine_path, "0" * 64)  # the engine was rebuilt since this was written
    earlier_build.write_bytes(b"kernels for the earlier engine")
    other_engine = runtime_cache_path(engine_path.with_name("kontext_fp8_2ref.engine"), SHA)
    other_engine.write_bytes(b"kernels for another engine")
    first, engine = backend(engine_path)
    assert engine.context_config is not None and not cache_file.exists()
    engine.compiles(b"kernels for 8704 tokens;")
    first._ran(((1, 8704, 64),))
    assert cache_file.read_bytes() == b"kernels for 8704 tokens;"
    assert not earlier_build.exists() and other_engine.read_bytes() == b"kernels for another engine"
    engine.compiles(b"specialised later;")
    first._ran(((1, 8704, 64),))  # a shape already run: nothing new is expected, nothing written
    assert cache_file.read_bytes() == b"kernels for 8704 tokens;"
    engine.compiles(b"kernels for 2560 tokens;")
    first._ran(((1, 2560, 64),))
    assert cache_file.read_bytes() == b"kernels for 8704 tokens;specialised later;kernels for 2560 tokens;"
    engine.compiles(b"more;")
    first.release()  # ComfyUI unloads the model
    saved = cache_file.read_bytes()
    assert saved.endswith(b"more;")

    second, engine = backend(engine_path)  # the next session starts from the file
    assert engine.cache.kernels == saved
    assert [f for f in store_files(engine_path.parent) if f.endswith(".partial")] == []


def test_a_cache_from_another_gpu_or_driver_is_replaced(engine_path):
    cache_file = runtime_cache_path(engine_path, SHA)
    cache_file.write_bytes(b"kernels for another GPU")
    b, engine = backend(engine_path, compatible=False)
    assert engine.cache.kernels == b"" and engine.context_config is not None  # refused, and the engine still runs
    engine.compiles(b"kernels for this GPU")
    b._ran(((1, 8704, 64),))
    assert cache_file.read_bytes() == b"kernels for this GPU"


def test_full_tensorrt_has_no_runtime_cache(engine_path):
    b, engine = backend(engine_path, flavour="tensorrt")
    assert engine.context_config is None  # create_execution_context() as for any TensorRT engine
    b._ran(((1, 8704, 64),))
    b.release()
    assert store_files(engine_path.parent) == ["kontext_fp8.engine"]
