"""Build a TensorRT engine from the exported ONNX, with whichever TensorRT flavour is installed.

`tensorrt` (full TensorRT) first, else `tensorrt_rtx` (TensorRT for RTX, which also builds ahead of
time on a machine without a GPU). Both are driven through the same documented Python API:
Builder -> STRONGLY_TYPED network -> OnnxParser -> BuilderConfig (optimization profiles, timing
cache, progress monitor) -> build_serialized_network.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import KontextConfig
from .shape_profiles import ShapeProfile

FLAVOURS = ("tensorrt", "tensorrt_rtx")


class TensorRTMissing(RuntimeError):
    """Neither TensorRT flavour is importable."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build; carries TensorRT's own messages."""


class EngineBuildCancelled(RuntimeError):
    """The build was cancelled (ComfyUI's interrupt) before it finished."""


@dataclass(frozen=True)
class BuiltEngine:
    serialized: memoryview  # of TensorRT's IHostMemory (see build_engine)
    io: dict[str, tuple[str, tuple[int, ...]]]  # {name: (dtype, shape)} as TensorRT parsed the network


@dataclass(frozen=True)
class TensorRT:
    module: object
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str


def import_tensorrt(prefer: str | None = None) -> TensorRT:
    """The installed TensorRT flavour (full TensorRT first), or TensorRTMissing saying how to install one."""
    import importlib

    errors = []
    for name in ([prefer] if prefer else FLAVOURS):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        return TensorRT(module, name, module.__version__)
    raise TensorRTMissing("no TensorRT is installed: `pip install tensorrt-rtx-cu12` (RTX GPUs, compute capability "
                          "8.0-8.9 and 12.x) or full `tensorrt` (datacenter GPUs such as H100); tried " + "; ".join(errors))


def compute_capability_target(trt: TensorRT, compute_capability: tuple[int, int] | None):
    """TensorRT-RTX builds for named GPU generations; None means the GPU of this machine."""
    if trt.flavour != "tensorrt_rtx":
        return None
    cc_enum = trt.module.ComputeCapability
    if compute_capability is None:
        return cc_enum.CURRENT
    name = f"SM{compute_capability[0]}{compute_capability[1]}"
    if name not in cc_enum.__members__:
        supported = [m for m in cc_enum.__members__ if m.startswith("SM")]
        raise EngineBuildError(f"TensorRT-RTX {trt.version} cannot build for compute capability "
                               f"{compute_capability[0]}.{compute_capability[1]}; it targets {supported}")
    return cc_enum.__members__[name]


def _logger_class(trt_module):
    class CollectingLogger(trt_module.ILogger):
        """Keeps TensorRT's warnings and errors so a failed build can say why."""

        def __init__(self):
            trt_module.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt_module.ILogger.Severity.WARNING:
                self.messages.append(f"[{severity.name}] {msg}")

    return CollectingLogger


def _progress_monitor_class(trt_module):
    class ProgressMonitor(trt_module.IProgressMonitor):
        """TensorRT's build phases -> progress(done, total, phase); returning False from step_complete cancels."""

        def __init__(self, progress, should_cancel):
            trt_module.IProgressMonitor.__init__(self)
            self.progress, self.should_cancel = progress, should_cancel
            self.phases: dict[str, tuple[int, int]] = {}
            self.cancelled = False
            self.lock = threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                self.phases[phase_name] = (0, num_steps)

        def step_complete(self, phase_name, step):
            with self.lock:
                total = self.phases.get(phase_name, (0, step + 1))[1]
                self.phases[phase_name] = (step + 1, total)
            if self.progress is not None:
                self.progress(step + 1, max(total, 1), phase_name)
            if self.should_cancel is not None and self.should_cancel():
                self.cancelled = True
                return False
            return True

        def phase_finish(self, phase_name):
            with self.lock:
                self.phases.pop(phase_name, None)

    return ProgressMonitor


def build_engine(onnx_path: str | Path, cfg: KontextConfig, profiles: list[ShapeProfile], *,
                 timing_cache: str | Path | None = None, tmp_dir: str | Path | None = None,
                 compute_capability: tuple[int, int] | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, trt: TensorRT | None = None) -> BuiltEngine:
    """Parse the ONNX and build a serialized engine with one optimization profile per ShapeProfile;
    returns it with the network's I/O names, dtypes and shapes (for the sidecar, without a second parse).
    tmp_dir: where the timing cache's temporary file is written (the build's scratch folder)."""
    trt = trt or import_tensorrt()
    m = trt.module
    logger = _logger_class(m)()
    builder = m.Builder(logger)
    # Strongly typed: the Q/DQ and casts in the ONNX decide every precision; TensorRT picks none itself.
    network = builder.create_network(1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = m.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT ({trt.flavour} {trt.version}) could not parse {onnx_path}: " +
                               "; ".join(errors + logger.messages[-5:]))

    tensors = [network.get_input(i) for i in range(network.num_inputs)] + \
              [network.get_output(i) for i in range(network.num_outputs)]
    io = {t.name: (t.dtype.name, tuple(t.shape)) for t in tensors}
    config = builder.create_builder_config()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        shapes = profile.input_shapes(cfg)
        missing = set(shapes) - inputs
        if missing:
            raise EngineBuildError(f"ONNX {onnx_path} lacks engine inputs {sorted(missing)} (has {sorted(inputs)})")
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)

    target = compute_capability_target(trt, compute_capability)
    if target is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(target, 0)

    # TensorRT-RTX builds without timing kernels (its timing cache calls are no-ops since 1.2), so only
    # full TensorRT keeps a cache; it is per GPU architecture and TensorRT version (the caller's file name).
    use_cache = timing_cache is not None and trt.flavour == "tensorrt"
    if use_cache:
        cache = config.create_timing_cache(Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor_class(m)(progress, should_cancel)
    config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if monitor.cancelled:
        raise EngineBuildCancelled("engine build cancelled")
    if serialized is None:
        raise EngineBuildError(f"TensorRT ({trt.flavour} {trt.version}) failed to build the engine: " +
                               ("; ".join(logger.messages[-10:]) or "no message from TensorRT"))
    if use_cache:
        from .atomic import write_atomically

        data = bytes(config.get_timing_cache().serialize())
        write_atomically(timing_cache, lambda tmp: tmp.write_bytes(data), tmp_dir=tmp_dir)
    # A view of TensorRT's buffer, not bytes(): a full-size engine is ~12 GB (FP8), and a copy would hold it twice
    # in system memory, beside the builder's and ComfyUI's own, until the store has written it.
    return BuiltEngine(memoryview(serialized).cast("B"), io)

