"""The TensorRT backend: a built engine run on torch tensors, on ComfyUI's current CUDA stream.

Everything that decides (does this engine fit this machine; which optimization profile takes this
input; how to split a batch no profile takes) is plain logic here, tested without a GPU. The part
that touches TensorRT is kept thin and written to TensorRT's documented Python API (Runtime,
deserialize_cuda_engine, create_execution_context, set_optimization_profile_async, set_input_shape,
set_tensor_address, execute_async_v3). NOT RUN ON A GPU YET: no GPU available to this project runs a
TensorRT engine (docs/building-engines.md). On the CPU, its execute path runs end to end against a stand-in
engine that computes the exported graph with ONNX Runtime (tests/tensorrt_standin.py; docs/tensorrt.md).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import KontextConfig
from .contract import INPUT_NAMES, OUTPUT_NAME, check_inputs
from .engine_store import verify_engine
from .shape_profiles import ProfileError, ShapeProfile
from .tensorrt_runtime_cache import RuntimeCacheFile

TORCH_DTYPES = {"HALF": torch.float16, "BF16": torch.bfloat16, "FLOAT": torch.float32}
# IExecutionContext.set_tensor_address: "The pointer must have at least 256-byte alignment."
TENSORRT_ALIGNMENT = 256


class EngineMismatch(RuntimeError):
    """An engine built for another model family, TensorRT, or GPU than this machine's."""


def check_engine_metadata(meta: dict, flavour: str, version: str, gpu: tuple[int, int] | None, gpu_name: str = "") -> None:
    """Explain, before any GPU memory is touched, why this engine cannot run here."""
    if meta.get("model_config", {}).get("hidden_size") is None or "recipe" not in meta:
        raise EngineMismatch("engine: its sidecar does not describe a Kontext transformer engine")
    built = meta["tensorrt"]
    if built["flavour"] != flavour:
        raise EngineMismatch(f"engine: built with {built['flavour']} {built['version']}, but this ComfyUI has {flavour} "
                             f"{version}; engines do not move between TensorRT flavours: rebuild it")
    if built["version"] != version:
        raise EngineMismatch(f"engine: built with {flavour} {built['version']}, this ComfyUI has {version}; TensorRT "
                             "engines only load in the version that built them: rebuild it")
    if gpu is None:
        raise EngineMismatch("engine: TensorRT engines run on an NVIDIA GPU; none was found")
    target = meta.get("target", "")
    cc = f"{gpu[0]}.{gpu[1]}"
    if not target.endswith(cc):
        raise EngineMismatch(f"engine: built for GPU {target!r}, this GPU is {gpu_name or 'compute capability'} {cc}: "
                             "rebuild it on this machine")
    if flavour == "tensorrt_rtx" and gpu == (9, 0):
        raise EngineMismatch("engine: TensorRT-RTX does not run on compute capability 9.0 (H100 / H200)")


@dataclass(frozen=True)
class Chunk:
    profile: int
    start: int  # batch rows [start, stop)
    stop: int


def plan_batches(profiles: list[ShapeProfile], batch: int, image_tokens: int, text_tokens: int) -> list[Chunk]:
    """Which profile runs which rows: the first profile whose token ranges fit, the batch split into
    pieces of at most that profile's max batch (ComfyUI may send cond + uncond and more at once)."""
    for i, p in enumerate(profiles):
        if p.image_tokens[0] <= image_tokens <= p.image_tokens[2] and p.text_tokens[0] <= text_tokens <= p.text_tokens[2]:
            step = p.batch[2]
            return [Chunk(i, s, min(s + step, batch)) for s in range(0, batch, step)]
    p = profiles[0]
    p.check(1, image_tokens, text_tokens)  # raises, naming the range and the value
    raise ProfileError(f"engine: no profile takes {image_tokens} image and {text_tokens} text tokens")


class TensorRTBackend(nn.Module):
    """Engine contract in, target tokens out, through a deserialized engine. Holds no torch parameters.

    The engine is deserialized when it first runs and released by release() (the ComfyUI MODEL calls
    it when ComfyUI unloads the model), so its GPU memory follows ComfyUI's model management. A TensorRT-RTX
    engine keeps the kernels it compiles on this GPU in a runtime cache beside it (tensorrt_runtime_cache.py),
    written after the first run of each new input shape and on release().
    """

    def __init__(self, engine_path: str | Path, meta: dict, trt, config: KontextConfig):
        super().__init__()
        self.config = config
        self.engine_path = Path(engine_path)
        self.meta = meta
        self.profiles = [ShapeProfile(p["name"], tuple(p["batch"]), tuple(p["image_tokens"]), tuple(p["text_tokens"]))
                         for p in meta["profiles"]]
        self.io_dtypes = {name: TORCH_DTYPES[v["dtype"]] for name, v in meta["io"].items()}
        m = trt.module
        self._logger = m.Logger(m.Logger.WARNING)
        self._runtime = m.Runtime(self._logger)
        self._engine = self._context = self._profile = None
        self._runtime_cache = (RuntimeCacheFile(self.engine_path, meta["engine_sha256"])
                               if trt.flavour == "tensorrt_rtx" else None)
        self._shapes_run = set()

    def _ensure_loaded(self) -> None:
        if self._context is not None:
            return
        # Loaded again after every unload, maybe much later: the file must still be the one the sidecar describes
        # (a rebuild replaces it under the same name). Its hash is remembered, so this costs a stat.
        verify_engine(self.engine_path, self.meta)
        # Mapped, not read: a full-size engine (~12 GB) would otherwise be copied into ComfyUI's memory before
        # TensorRT copies it to the GPU; the binding takes any buffer.
        with open(self.engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            self._engine = self._runtime.deserialize_cuda_engine(mapped)
        if self._engine is None:
            raise EngineMismatch(f"engine {self.engine_path.name}: TensorRT could not deserialize it")
        if self._runtime_cache is None:
            self._context = self._engine.create_execution_context()
        else:
            self._context = self._engine.create_execution_context(self._runtime_cache.runtime_config(self._engine))
        self._profile = None

    def release(self) -> None:
        """Free the engine's GPU memory (weights and activation workspace); the next call loads it again."""
        if self._runtime_cache is not None and self._context is not None:
            self._runtime_cache.save()
        self._context = self._engine = self._profile = None

    def _ran(self, shapes: tuple) -> None:
        """After a run: the first of a new input shape has had its kernels compiled (TensorRT-RTX): keep them."""
        if self._runtime_cache is not None and shapes not in self._shapes_run:
            self._shapes_run.add(shapes)
            self._runtime_cache.save()

    @property
    def dtype(self) -> torch.dtype:
        return self.io_dtypes["img"]

    def _stream(self, device: torch.device) -> int:
        """The stream the engine runs on: ComfyUI's current one on device, so no sync with its other work is needed.
        (The one thing the CPU tests replace: their stand-in engine reads host memory.)"""
        if device.type != "cuda":  # TensorRT would read a host address as a device one
            raise ValueError(f"engine: inputs must be on a CUDA device, got {device}")
        return torch.cuda.current_stream(device).cuda_stream

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor) -> Tensor:
        check_inputs(self.config, img, img_ids, txt, txt_ids, timesteps, y, guidance)
        inputs = dict(zip(INPUT_NAMES, (img, img_ids, txt, txt_ids, timesteps, y, guidance)))
        chunks = plan_batches(self.profiles, img.shape[0], img.shape[1], txt.shape[1])
        outs = [self._run(c.profile, {k: v[c.start:c.stop] for k, v in inputs.items()}) for c in chunks]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, profile: int, inputs: dict[str, Tensor]) -> Tensor:
        img = inputs["img"]
        stream = self._stream(img.device)
        self._ensure_loaded()
        if self._profile != profile:
            self._context.set_optimization_profile_async(profile, stream)
            self._profile = profile
        out = aligned_empty((img.shape[0], img.shape[1], self.config.out_channels), self.io_dtypes[OUTPUT_NAME],
                            img.device)
        enqueue(self._context, stream, inputs, self.io_dtypes, out)
        self._ran(tuple(tuple(t.shape) for t in inputs.values()))
        return out


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor at a TENSORRT_ALIGNMENT-aligned address. PyTorch's CUDA allocator happens to
    align blocks to 512 bytes, its CPU one to 64; carving the tensor out of a byte buffer makes the alignment
    TensorRT requires a property of this code on any device, not of an allocator's internals."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    buffer = torch.empty(nbytes + TENSORRT_ALIGNMENT - 1, dtype=torch.uint8, device=device)
    offset = -buffer.data_ptr() % TENSORRT_ALIGNMENT
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def engine_ready(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as an engine reads it: in dtype, contiguous, at an aligned address. A tensor ComfyUI allocated in the
    engine's dtype passes through untouched; a batch piece (plan_batches) is a view at an offset, e.g. a [B]
    timestep's third row sits 8 bytes in, and is copied."""
    t = t.to(dtype).contiguous()
    if t.data_ptr() % TENSORRT_ALIGNMENT == 0:
        return t
    aligned = aligned_empty(tuple(t.shape), dtype, t.device)
    aligned.copy_(t)
    return aligned


def enqueue(context, stream: int, inputs: dict[str, Tensor], dtypes: dict[str, torch.dtype], out: Tensor) -> list[Tensor]:
    """Bind inputs and out to an execution context whose optimization profile is set, and enqueue it on stream.
    Returns the bound tensors. Copies made here may be freed once this returns: PyTorch's allocator reuses a
    block only in order on the stream that made it, which is the stream the engine runs on."""
    bound = []
    for name, t in inputs.items():
        t = engine_ready(t, dtypes[name])
        if not context.set_input_shape(name, tuple(t.shape)):
            raise ProfileError(f"engine: input {name} of shape {tuple(t.shape)} is outside the selected profile "
                               "(see ComfyUI's log for TensorRT's message)")
        if not context.set_tensor_address(name, t.data_ptr()):
            raise EngineMismatch(f"engine: has no input named {name}; it was not built from this pack's contract")
        bound.append(t)
    if out.data_ptr() % TENSORRT_ALIGNMENT:
        raise ValueError(f"engine: output buffer at {out.data_ptr():#x} is not {TENSORRT_ALIGNMENT}-byte aligned")
    if not context.set_tensor_address(OUTPUT_NAME, out.data_ptr()):
        raise EngineMismatch(f"engine: has no output named {OUTPUT_NAME}; it was not built from this pack's contract")
    if not context.execute_async_v3(stream):
        raise RuntimeError("TensorRT: execute_async_v3 failed (see ComfyUI's log for TensorRT's message)")
    return bound


def engine_device_bytes(engine_path: str | Path) -> int:
    """The size ComfyUI's model management is told: the engine file (its weights). TensorRT's activation
    memory is not included, so this is a lower bound."""
    return Path(engine_path).stat().st_size


def choose_backend(requested: str, meta: dict, trt_or_error, gpu: tuple[int, int] | None, gpu_name: str = "") -> tuple[str, str]:
    """("tensorrt" | "pytorch", why). auto: TensorRT when this engine can run here, else PyTorch.

    trt_or_error: the imported TensorRT (tensorrt_build.TensorRT) or the exception importing it raised.
    An explicit "tensorrt" that cannot run raises the reason instead of falling back.
    """
    if requested not in ("auto", "tensorrt", "pytorch"):
        raise ValueError(f"backend: expected 'auto', 'tensorrt' or 'pytorch', got {requested!r}")
    if requested == "pytorch":
        return "pytorch", "asked for"
    try:
        if isinstance(trt_or_error, Exception):
            raise EngineMismatch(str(trt_or_error))
        check_engine_metadata(meta, trt_or_error.flavour, trt_or_error.version, gpu, gpu_name)
    except EngineMismatch as e:
        if requested == "tensorrt":
            raise
        return "pytorch", f"the TensorRT engine cannot run here ({e})"
    return "tensorrt", "the engine matches this GPU and TensorRT"
