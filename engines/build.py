"""The whole build: calibrate (or reuse a calibrated state) -> export ONNX -> TensorRT engine -> store.

Cancellation is checked between calibration pairs, before the export and during TensorRT's build;
a cancelled or failed build leaves no engine and no sidecar (the store writes both only at the
end, atomically), and the temporary ONNX is removed unless asked to keep it. The calibrated state
is kept beside the engines, so a cancelled build resumes from it.
"""
from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .calibrated_state import load_calibrated_state, read_calibrated, save_calibrated_state
from .comfy_export import write_state_from_checkpoint
from .calibration import CalibrationCancelled, EncodedPair, calibration_forward_loop
from .engine_store import EngineRequest, EngineStore
from .offload import blocks_streamed_to, move_quantizer_state
from .onnx_export import check_export_dependencies, export_onnx
from .quantize import quantize_transformer
from .recipes import Recipe
from .shape_profiles import ShapeProfile
from .source_weights import (SourceWeights, dequantize_fp8_weights, dequantized_blocks, from_state_dict,
                             pin_fp8_weight_amax, transformer_from_source)
from .tensorrt_build import EngineBuildCancelled, TensorRT, build_engine, import_tensorrt

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class BuildResult:
    engine: Path
    calibrated_state: Path | None
    cached: bool
    stages: dict = field(default_factory=dict)  # stage -> {"seconds", "peak_gpu_gib", "rss_gib"}


class StageRecorder:
    """Wall time and peak memory per stage, for the sidecar and the README's table."""

    def __init__(self, cuda: bool):
        self.cuda, self.stages = cuda, {}

    def run(self, name, fn):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        rec = {"seconds": round(time.perf_counter() - start, 2),
               # ru_maxrss is the process's peak so far (kB on Linux), not this stage's alone.
               "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        if self.cuda:
            rec["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.stages[name] = rec
        return out


def engine_request(fingerprint: str, config, recipe: Recipe, profiles: Sequence[ShapeProfile],
                   calibration: dict, trt: TensorRT, compute_capability: tuple[int, int] | None,
                   loras: Sequence[dict] = ()) -> EngineRequest:
    from . import __version__

    if compute_capability is not None:
        target = f"{compute_capability[0]}.{compute_capability[1]}"
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        target = f"{torch.cuda.get_device_name()} {major}.{minor}"
    else:
        target = "unknown"
    return EngineRequest(model_fingerprint=fingerprint, model_config=config.to_dict(),
                         recipe=recipe.to_json(), profiles=tuple(p.to_dict() for p in profiles), calibration=calibration,
                         tensorrt_flavour=trt.flavour, tensorrt_version=trt.version, target=target,
                         pack_version=__version__, loras=tuple(loras))


def build_kontext_engine(weights: SourceWeights | Mapping[str, torch.Tensor], recipe: Recipe, profiles: Sequence[ShapeProfile],
                         samples: Sequence[EncodedPair], steps: int, store: EngineStore, *,
                         calibration_name: str = "custom", compute_capability: tuple[int, int] | None = None,
                         keep_onnx: bool = False, low_vram: bool = False, device=None, calibrated_from: Path | None = None,
                         progress: Progress | None = None,
                         should_cancel: Callable[[], bool] | None = None, trt: TensorRT | None = None,
                         source: dict | None = None, loras: Sequence[dict] = ()) -> BuildResult:
    """Build (or find) the engine for this model, recipe and profiles. weights: the transformer's weights
    (SourceWeights, or a state dict: ComfyUI's tensors, shared, never modified), 16-bit or FP8 per-tensor.
    An FP8 source is calibrated with its blocks dequantized one at a time, and keeps its own FP8 weights
    and scales in the engine (see source_weights.pin_fp8_weight_amax).

    low_vram: sd stays in system memory; calibration streams one block at a time to the GPU and the
    export runs on the CPU (FP8 max calibration only: it never rewrites weights). device: where a file's tensors
    are read to (None: where the weights are, e.g. ComfyUI's tensors on its GPU). calibrated_from: an exported
    checkpoint (comfy_export.py) whose embedded state is used instead of calibrating; its recipe must be `recipe`.

    LoRA baked in: `weights` are the patched ones (source_weights.with_patches, or ComfyUI's patched MODEL),
    `source` describes the unpatched source (file, fingerprint) and `loras` what was applied (each a dict with
    at least its hash and strength); both go into the request's key and the sidecar.
    """
    recipe.check_exportable()  # before any calibration work
    trt = trt or import_tensorrt()
    if loras and source is None:
        raise ValueError("build_kontext_engine: LoRAs baked in need the unpatched source's description (source=...)")
    if not isinstance(weights, SourceWeights):
        weights = from_state_dict(weights, name=None)  # no file: the sidecar records no source name
    source = source or weights.describe()
    model = transformer_from_source(weights, device=device)
    calibration = {"set": calibration_name, "pairs": len(samples), "steps": steps}
    if calibrated_from is not None:
        embedded = read_calibrated(calibrated_from)[0]
        if embedded.to_json() != recipe.to_json():
            raise ValueError(f"{Path(calibrated_from).name}: calibrated with recipe {embedded.name}"
                             f"{' and FP8 attention' if embedded.attention else ''}, not the {recipe.name} asked for")
        calibration = {"set": f"embedded in {Path(calibrated_from).name}", "pairs": 0, "steps": 0}
    request = engine_request(source["fingerprint"], model.config, recipe, profiles, calibration, trt, compute_capability,
                             loras)
    cached = store.lookup(request)
    state_path = store.root / f"{request.name()}.calibration.safetensors"
    if cached is not None:
        return BuildResult(cached, state_path if state_path.is_file() else None, cached=True)
    check_export_dependencies(recipe)  # a cached engine needs no export

    if low_vram and (recipe.algorithm["method"] != "max" or recipe.needs_cuda):
        raise ValueError(f"low_vram: supports recipes with max calibration and CPU-capable formats (fp8), not "
                         f"{recipe.name}; NVFP4 and SVDQuant need the model on the GPU")
    if low_vram and not torch.cuda.is_available():
        raise ValueError("low_vram: streams blocks to a CUDA GPU; none is available")
    cuda = low_vram or next(model.parameters()).is_cuda
    stages = StageRecorder(cuda)

    def report(stage):
        return None if progress is None else (lambda done, total, *_: progress(stage, done, total))

    def cancel_point(where):
        if should_cancel is not None and should_cancel():
            raise EngineBuildCancelled(f"engine build cancelled before {where}")

    if calibrated_from is not None and not state_path.is_file():
        write_state_from_checkpoint(calibrated_from, state_path)  # resumed from below: no calibration
    calibrate_or_resume(model, recipe, samples, steps, state_path, stages, low_vram=low_vram,
                        progress=report("calibrate"), should_cancel=should_cancel)
    cancel_point("the ONNX export")
    store.root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kontext_build_", dir=store.root))
    onnx_path = workdir / "kontext.onnx"
    try:
        dequantize_fp8_weights(model)  # the ONNX holds 16-bit weights behind their Q/DQ, as for a 16-bit source
        export_stage(model, onnx_path, stages)
        del model  # the 16-bit module and its quantizers are not needed by TensorRT's builder
        if cuda:
            torch.cuda.empty_cache()
        cancel_point("the TensorRT build")
        timing_cache = store.root / f"timing_cache_{trt.flavour}_{trt.version}_{request.target.replace(' ', '_')}.cache"
        built = stages.run("build_engine", lambda: build_engine(
            onnx_path, cfg_from(request), list(profiles), timing_cache=timing_cache,
            compute_capability=compute_capability, progress=report("build_engine"), should_cancel=should_cancel, trt=trt))
        metadata = dict(
            model_fingerprint=request.model_fingerprint, source=source, loras=list(request.loras),
            model_config=request.model_config,
            recipe=json.loads(request.recipe), profiles=list(request.profiles), calibration=calibration,
            tensorrt={"flavour": trt.flavour, "version": trt.version}, target=request.target,
            build_gpu=_gpu_description(),
            pack_version=request.pack_version, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            io={name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in built.io.items()},
            stages=stages.stages)
        path = store.save(request, built.serialized, metadata)
    finally:
        if keep_onnx and onnx_path.is_file():
            # The folder moves whole: the .onnx names its external data file relative to itself.
            workdir.replace(store.root / f"{request.name()}.onnx.d")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return BuildResult(path, state_path, cached=False, stages=stages.stages)


def calibrate_or_resume(model, recipe: Recipe, samples, steps: int, state_path: Path, stages: StageRecorder, *,
                        low_vram: bool = False, progress=None, should_cancel=None) -> None:
    """Quantize `model` in place: from the saved calibrated state if there is one, else by calibrating
    (then saving the state, so a later build resumes from it)."""
    fp8_scales = dict(getattr(model, "fp8_weight_scales", {}))
    if state_path.is_file():
        stages.run("calibrate (resumed from saved state)", lambda: load_calibrated_state(model, state_path))
        return
    if fp8_scales and (recipe.algorithm["method"] != "max" or recipe.rewrites_weights):
        dequantize_fp8_weights(model)  # these calibrations rewrite or search over the weights: 16-bit throughout
    loop = calibration_forward_loop(samples, steps, progress=progress, should_cancel=should_cancel)
    loop = _streamed(loop, "cuda" if low_vram else None)
    try:
        stages.run("calibrate", lambda: quantize_transformer(model, recipe, loop))
    except CalibrationCancelled as e:
        raise EngineBuildCancelled(str(e)) from e
    if low_vram:
        move_quantizer_state(model, next(model.parameters()).device)
    pin_fp8_weight_amax(model, fp8_scales)
    stages.run("save_calibrated_state", lambda: save_calibrated_state(model, recipe, state_path))


def export_stage(model, onnx_path: Path, stages: StageRecorder) -> None:
    stages.run("export_onnx", lambda: export_onnx(model, onnx_path))


def _gpu_description() -> dict | None:
    """The GPU this build ran on (None on a CPU-only machine: an ahead-of-time TensorRT-RTX build)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _streamed(loop, device):
    """loop with each block's FP8 weights dequantized only while it runs and, given a device (low_vram), each
    block's weights on it only then."""
    def streamed_loop(model):
        if device is None:
            with dequantized_blocks(model):
                loop(model)
            return
        with blocks_streamed_to(model, device), dequantized_blocks(model, device):
            loop(model)
    return streamed_loop


def cfg_from(request: EngineRequest):
    from .config import KontextConfig

    return KontextConfig.from_dict(request.model_config)
