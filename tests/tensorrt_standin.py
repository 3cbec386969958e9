"""A stand-in for TensorRT's runtime that computes with ONNX Runtime, so TensorRTBackend's execute path runs on a CPU.

What TensorRTBackend calls, answered as TensorRT documents it and checked as TensorRT checks it:
Runtime(logger).deserialize_cuda_engine(buffer) -> engine (None for bytes it cannot load);
engine.create_execution_context() -> context; context.set_optimization_profile_async(index, stream) (the shapes
and addresses set before are forgotten, so each must be set again for the new profile);
set_input_shape(name, shape) (False for a name the engine has no input of, a rank or fixed dimension other than the
engine's, or a shape outside the selected profile); set_tensor_address(name, address) (False for an unknown name
or an address that is not 256-byte aligned); execute_async_v3(stream) (False unless every input has a shape and
an address and the output an address).

The "engine file" is the exported ONNX as written by the build (TensorRT custom ops and all); deserializing it makes
the standard-Q/DQ float32 copy (engine_numerics.standard_qdq_copy) and an ONNX Runtime session. The engine's
inputs and output have the exported graph's dtypes (FP16 or BF16 for img, txt, y and out, as TensorRT reports
them); execute reads every input from the address it was given, as that dtype and the shape that was set, and
writes the output there the same way: a tensor bound at a wrong address, in a wrong dtype or shape, computes
garbage here as on a GPU. Memory is host memory: TensorRTBackend runs with HostMemoryBackend, which differs from
it only in the stream (no CUDA stream on a CPU).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from types import SimpleNamespace

import onnx
import torch
from engine_numerics import io_dtype_names, ort_session, standard_qdq_copy

from engines.contract import OUTPUT_NAME
from engines.runtime_tensorrt import TENSORRT_ALIGNMENT, TORCH_DTYPES, TensorRTBackend
from engines.shape_profiles import ShapeProfile
from engines.tensorrt_build import TensorRT

STANDIN_STREAM = 7  # what HostMemoryBackend hands the context as its stream handle
STANDIN_VERSION = "stand-in (ONNX Runtime)"


class HostMemoryBackend(TensorRTBackend):
    """TensorRTBackend on host memory, for the stand-in engine: everything but the CUDA stream is TensorRTBackend's."""

    def _stream(self, device: torch.device) -> int:
        if device.type != "cpu":
            raise ValueError(f"stand-in engine: reads host memory, got inputs on {device}")
        return STANDIN_STREAM


def host_view(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The memory at address as a tensor (no copy): what an engine reads and writes at a bound address."""
    buffer = (ctypes.c_char * (prod(shape) * dtype.itemsize)).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


@dataclass
class Run:
    profile: int
    stream: int
    shapes: dict


@dataclass
class StandInContext:
    engine: "StandInEngine"
    profile: int | None = None
    shapes: dict = field(default_factory=dict)
    addresses: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)  # (call, name, why) TensorRT would log as an error
    profile_calls: list = field(default_factory=list)
    runs: list = field(default_factory=list)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < len(self.engine.profiles):
            self.refused.append(("set_optimization_profile_async", index, "no such profile"))
            return False
        self.profile, self.shapes, self.addresses = index, {}, {}
        self.profile_calls.append((index, stream))
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        if self.profile is None or name not in self.engine.inputs:
            self.refused.append(("set_input_shape", name, "no profile selected" if self.profile is None else
                                 "not an input"))
            return False
        fixed = self.engine.shapes[name]
        lo, _, hi = self.engine.profiles[self.profile].input_shapes(self.engine.config)[name]
        ok = (len(shape) == len(fixed) and all(f < 0 or f == s for f, s in zip(fixed, shape))
              and all(a <= s <= b for a, s, b in zip(lo, shape, hi)))
        if not ok:
            self.refused.append(("set_input_shape", name, f"{tuple(shape)} outside {lo}..{hi} of profile {self.profile}"))
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.dtypes or address % TENSORRT_ALIGNMENT:
            self.refused.append(("set_tensor_address", name, "unknown tensor" if name not in self.engine.dtypes
                                 else f"address {address:#x} not {TENSORRT_ALIGNMENT}-byte aligned"))
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        missing = [n for n in self.engine.inputs if n not in self.shapes or n not in self.addresses]
        if missing or OUTPUT_NAME not in self.addresses:
            self.refused.append(("execute_async_v3", missing or OUTPUT_NAME, "shape or address not set"))
            return False
        inputs = {n: host_view(self.addresses[n], self.shapes[n], self.engine.dtypes[n]) for n in self.engine.inputs}
        try:
            (out,) = self.engine.session.run([OUTPUT_NAME], {n: t.float().numpy() for n, t in inputs.items()})
        except Exception as e:  # ONNX Runtime's own error types: shapes that do not fit together, as TensorRT refuses
            self.refused.append(("execute_async_v3", None, str(e)))
            return False
        host_view(self.addresses[OUTPUT_NAME], out.shape, self.engine.dtypes[OUTPUT_NAME]).copy_(torch.from_numpy(out))
        self.runs.append(Run(self.profile, stream, dict(self.shapes)))
        return True


def io_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """{input/output name: shape, -1 on dynamic axes}, as TensorRT reports an engine's tensor shapes."""
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
            for v in list(proto.graph.input) + list(proto.graph.output)}


class StandInEngine:
    def __init__(self, proto: onnx.ModelProto, profiles: list[ShapeProfile], config):
        self.profiles, self.config = profiles, config
        self.inputs = [v.name for v in proto.graph.input]
        self.dtypes = {name: TORCH_DTYPES[d] for name, d in io_dtype_names(proto).items()}
        self.shapes = io_shapes(proto)
        self.session = ort_session(standard_qdq_copy(proto).model)
        self.contexts: list[StandInContext] = []

    def create_execution_context(self) -> StandInContext:
        context = StandInContext(self)
        self.contexts.append(context)
        return context


def standin_tensorrt(profiles: list[ShapeProfile], config) -> TensorRT:
    """A `tensorrt_build.TensorRT` whose module's Runtime deserializes exported ONNX into stand-in engines
    (profiles: the engine's optimization profiles, as a real engine carries them). `.engines` lists those made."""
    engines: list[StandInEngine] = []

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, buffer):
            try:
                proto = onnx.load_from_string(bytes(buffer))
            except Exception:  # protobuf's DecodeError and friends: not an engine this runtime made
                return None
            if not proto.graph.node:
                return None
            engine = StandInEngine(proto, profiles, config)
            engines.append(engine)
            return engine

    module = SimpleNamespace(Logger=Logger, Runtime=Runtime, engines=engines)
    return TensorRT(module, "tensorrt", STANDIN_VERSION)


def save_standin_engine(onnx_path: Path, store_root: Path, profiles: list[ShapeProfile], config, recipe,
                        state: Path | None = None, checkpoint: Path | None = None) -> tuple[Path, dict]:
    """An engine file (the exported ONNX) and its sidecar as the build writes them, into an EngineStore folder
    (and the calibrated state beside it, named as the build names it; the sidecar names `checkpoint` as the source
    it was built from, with its fingerprint, as a build from that file does); returns (engine path, sidecar)."""
    from engines.engine_store import EngineRequest, EngineStore
    from engines.scratch import Scratch
    from engines.source_weights import open_checkpoint

    proto = onnx.load(str(onnx_path))
    data = onnx_path.read_bytes()
    source = {"name": None, "format": "stand-in (the exported ONNX)", "fingerprint": hashlib.sha256(data).hexdigest()}
    if checkpoint is not None:
        with open_checkpoint(checkpoint) as weights:
            source = weights.describe()
    request = EngineRequest(model_fingerprint=source["fingerprint"], model_config=config.to_dict(),
                            recipe=recipe.to_json(), profiles=tuple(p.to_dict() for p in profiles),
                            calibration={"set": "tiny", "pairs": 3, "steps": 2}, tensorrt_flavour="tensorrt",
                            tensorrt_version=STANDIN_VERSION, target="stand-in", pack_version="test")
    io = {name: {"dtype": dtype, "shape": list(io_shapes(proto)[name])} for name, dtype in io_dtype_names(proto).items()}
    metadata = dict(model_fingerprint=source["fingerprint"], source=source, model_config=config.to_dict(),
                    recipe=json.loads(recipe.to_json()),
                    profiles=[p.to_dict() for p in profiles], tensorrt={"flavour": "tensorrt", "version": STANDIN_VERSION},
                    target="stand-in", io=io, calibration=dict(request.calibration), pack_version="test",
                    built_at="stand-in")
    store = EngineStore(store_root)
    store_root.mkdir(parents=True, exist_ok=True)
    with Scratch(store_root) as scratch:  # the store writes through a build's scratch folder, as a build does
        path = store.save(request, data, metadata, scratch.path)
    if state is not None:
        (store_root / f"{path.stem}.calibration.safetensors").write_bytes(Path(state).read_bytes())
    return path, store.read_metadata(path)
