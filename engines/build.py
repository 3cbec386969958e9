"""The whole build: calibrate (or reuse a calibrated state) -> export ONNX -> TensorRT engine -> store.

Everything that can be checked is checked before calibration: the recipe, the names it and the profile give
the engine files, the calibration pairs (finite, of the contract's shapes), the weights (finite), and the
engine folder (a writable folder with room for the ONNX and the engine). The request's key covers the
calibration pairs' content, so a set edited in place is a new request.

One build of a request at a time: a second identical build waits for the first (holding ComfyUI's cancel)
and returns its engine. Cancellation is checked between calibration pairs, before the export and during
TensorRT's build. Every file a build writes is made in its own scratch folder in the store and renamed into
place when complete; a cancelled, failed or killed build leaves no engine, no sidecar and no ONNX (the next
build or load removes a killed one's scratch folder), unless keep_onnx. The calibrated state is kept beside
the engines, so a cancelled build resumes from it; a damaged one is replaced by calibrating again.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from filelock import Timeout

from .calibrated_state import CalibratedStateError, load_calibrated_state, read_calibrated, save_calibrated_state
from .calibration import (CalibrationCancelled, EncodedPair, calibration_content_hash, calibration_forward_loop,
                          check_encoded_pairs)
from .comfy_export import write_state_from_checkpoint
from .engine_store import EngineRequest, EngineStore, EngineStoreError, human_size
from .offload import blocks_streamed_to, move_quantizer_state
from .onnx_export import check_export_dependencies, export_onnx
from .quantize import quantize_transformer
from .recipes import Recipe
from .scratch import Scratch, remove_abandoned_scratch, request_lock
from .shape_profiles import ShapeProfile
from .source_weights import (SourceWeights, dequantize_fp8_weights, dequantized_blocks, from_state_dict,
                             pin_fp8_weight_amax, transformer_from_source)
from .tensorrt_build import EngineBuildCancelled, TensorRT, build_engine, import_tensorrt

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)
WAITING = "waiting for another build of this engine"  # the progress stage while the request's lock is held elsewhere


class BuildInputError(ValueError):
    """A build input that cannot make an engine (weights with NaN, an option this recipe or machine cannot take)."""


@dataclass
class BuildResult:
    engine: Path
    calibrated_state: Path | None
    cached: bool
    stages: dict = field(default_factory=dict)  # stage -> {"seconds", "peak_gpu_gib", "rss_gib"}


class StageRecorder:
    """Wall time and peak memory per stage, for the sidecar and docs/building-engines.md's table."""

    def __init__(self, cuda: bool):
        self.cuda, self.stages = cuda, {}
        self.current = None  # the stage running, or last run: what a failure was doing

    def run(self, name, fn):
        self.current = name
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
    calibration = _calibration(samples, steps, calibration_name, calibrated_from, recipe)
    trt = trt or import_tensorrt()
    if loras and source is None:
        raise ValueError("build_kontext_engine: LoRAs baked in need the unpatched source's description (source=...)")
    if not isinstance(weights, SourceWeights):
        weights = from_state_dict(weights, name=None)  # no file: the sidecar records no source name
    source = source or weights.describe()
    model = transformer_from_source(weights, device=device)
    request = engine_request(source["fingerprint"], model.config, recipe, profiles, calibration, trt, compute_capability,
                             loras)
    name = request.name()  # refuses a recipe or profile name that would leave the store
    if store.root.is_dir():
        remove_abandoned_scratch(store.root)
    state_path = store.root / f"{name}.calibration.safetensors"
    cached = store.lookup(request)
    if cached is not None:
        return BuildResult(cached, state_path if state_path.is_file() else None, cached=True)
    check_export_dependencies(recipe)  # a cached engine needs no export

    if low_vram and (recipe.algorithm["method"] != "max" or recipe.needs_cuda):
        raise BuildInputError(f"low_vram: supports recipes with max calibration and CPU-capable formats (fp8), not "
                              f"{recipe.name}; NVFP4 and SVDQuant need the model on the GPU")
    if low_vram and not torch.cuda.is_available():
        raise BuildInputError("low_vram: streams blocks to a CUDA GPU; none is available")
    needed = build_space_estimate(weights, model)
    store.prepare(needed_bytes=needed)
    check_finite_weights(model)

    stages = StageRecorder(low_vram or next(model.parameters()).is_cuda)
    with _request_locked(store, name, progress, should_cancel):
        cached = store.lookup(request)  # the build this one waited for made it
        if cached is not None:
            return BuildResult(cached, state_path if state_path.is_file() else None, cached=True)
        try:
            with Scratch(store.root) as scratch:
                path = _build(lambda: transformer_from_source(weights, device=device), model, recipe, profiles, samples,
                              steps, store, request, source, trt, scratch.path, state_path, stages,
                              compute_capability=compute_capability, calibrated_from=calibrated_from,
                              keep_onnx=keep_onnx, low_vram=low_vram, progress=progress, should_cancel=should_cancel)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(store.root).free  # with this build's files removed
            raise EngineStoreError(f"engine folder {store.root}: ran out of space in the build's stage "
                                   f"{stages.current} ({human_size(free)} free once this build's files were removed): "
                                   "free space there or choose another folder; nothing of this build was kept") from e
    return BuildResult(path, state_path, cached=False, stages=stages.stages)


def _calibration(samples, steps: int, name: str, calibrated_from, recipe: Recipe) -> dict:
    """The request's calibration record, its content hashed (a set edited in place is a new request): the encoded
    pairs, checked first; or the state embedded in an exported checkpoint, checked, of the recipe asked for."""
    if calibrated_from is None:
        check_encoded_pairs(samples, steps)
        return {"set": name, "pairs": len(samples), "steps": steps, "content_sha256": calibration_content_hash(samples)}
    embedded, _, amax = read_calibrated(calibrated_from)
    if embedded.to_json() != recipe.to_json():
        raise BuildInputError(f"{Path(calibrated_from).name}: calibrated with recipe {embedded.name}"
                              f"{' and FP8 attention' if embedded.attention else ''}, not the {recipe.name} asked for")
    h = hashlib.sha256()
    for key in sorted(amax):
        h.update(key.encode() + amax[key].detach().float().cpu().numpy().tobytes())
    return {"set": f"embedded in {Path(calibrated_from).name}", "pairs": 0, "steps": 0, "content_sha256": h.hexdigest()}


def _build(remake, model, recipe: Recipe, profiles, samples, steps: int, store: EngineStore, request: EngineRequest,
           source: dict, trt: TensorRT, scratch: Path, state_path: Path, stages: StageRecorder, *, compute_capability,
           calibrated_from, keep_onnx: bool, low_vram: bool, progress: Progress | None, should_cancel) -> Path:
    cuda = stages.cuda

    def report(stage):
        return None if progress is None else (lambda done, total, *_: progress(stage, done, total))

    def cancel_point(where):
        if should_cancel is not None and should_cancel():
            raise EngineBuildCancelled(f"engine build cancelled before {where}")

    if calibrated_from is not None:  # its state, written afresh each time (a few KB): resumed from below
        write_state_from_checkpoint(calibrated_from, state_path, tmp_dir=scratch)
    model = calibrate_or_resume(model, recipe, samples, steps, state_path, stages, remake=remake, tmp_dir=scratch,
                                low_vram=low_vram, progress=report("calibrate"), should_cancel=should_cancel)
    cancel_point("the ONNX export")
    onnx_dir = scratch / "onnx"
    onnx_dir.mkdir()
    onnx_path = onnx_dir / "kontext.onnx"
    try:
        dequantize_fp8_weights(model)  # the ONNX holds 16-bit weights behind their Q/DQ, as for a 16-bit source
        export_stage(model, onnx_path, stages)
        del model  # the 16-bit module and its quantizers are not needed by TensorRT's builder
        if cuda:
            torch.cuda.empty_cache()
        cancel_point("the TensorRT build")
        timing_cache = store.root / f"timing_cache_{trt.flavour}_{trt.version}_{request.target.replace(' ', '_')}.cache"
        built = stages.run("build_engine", lambda: build_engine(
            onnx_path, cfg_from(request), list(profiles), timing_cache=timing_cache, tmp_dir=scratch,
            compute_capability=compute_capability, progress=report("build_engine"), should_cancel=should_cancel, trt=trt))
        metadata = dict(
            model_fingerprint=request.model_fingerprint, source=source, loras=list(request.loras), model_config=request.model_config,
            recipe=json.loads(request.recipe), profiles=list(request.profiles), calibration=request.calibration,
            tensorrt={"flavour": trt.flavour, "version": trt.version}, target=request.target,
            build_gpu=_gpu_description(),
            pack_version=request.pack_version, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            io={name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in built.io.items()},
            stages=stages.stages)
        stages.current = "save_engine"  # not timed: the sidecar is written in it
        path = store.save(request, built.serialized, metadata, scratch)
    finally:
        if keep_onnx and onnx_path.is_file():
            _keep_onnx(onnx_dir, store.root / f"{request.name()}.onnx.d", scratch)
    return path


def _keep_onnx(onnx_dir: Path, dest: Path, scratch: Path) -> None:
    """The folder moves whole (the .onnx names its external data files relative to itself); an earlier build's
    folder of the same name moves into the scratch folder first, which is removed with it."""
    if dest.exists():
        os.replace(dest, scratch / "previous_onnx")
    os.replace(onnx_dir, dest)


@contextlib.contextmanager
def _request_locked(store: EngineStore, name: str, progress: Progress | None, should_cancel):
    """Hold the request's lock; while another build holds it, wait, answering ComfyUI's cancel each second."""
    lock = request_lock(store.root, name)
    waiting = False
    while True:
        try:
            lock.acquire(timeout=1.0)
            break
        except Timeout:
            if not waiting:
                waiting = True
                log.info("Kontext TRT: another build of %s is running; waiting for it, then using its engine", name)
                if progress is not None:
                    progress(WAITING, 0, 1)
            if should_cancel is not None and should_cancel():
                raise EngineBuildCancelled(f"engine build cancelled while {WAITING}") from None
    try:
        yield
    finally:
        lock.release()


def build_space_estimate(weights: SourceWeights, model) -> int:
    """Disk a build needs: the exported ONNX holds every weight in the model's compute dtype, the engine at most a
    byte per weight more (FP8; NVFP4 is less, and the 16-bit layers are ~1% of the weights)."""
    parameters = sum(math.prod(shape) for shape in weights.shapes().values())
    return parameters * (model.compute_dtype.itemsize + 1)


def check_finite_weights(model) -> None:
    """NaN or inf in a weight surfaces in calibration as ModelOpt's 'detected nan values in amax', naming nothing.
    Checked on the model's own tensors (ComfyUI's, or the file's as read), one at a time."""
    scales = getattr(model, "fp8_weight_scales", {})
    for key, t in model.named_parameters():
        values = t.detach().float() if t.dtype.itemsize == 1 else t.detach()  # FP8: isfinite wants a wider dtype
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise BuildInputError(f"model: weight {key}: expected finite values, got {bad} NaN or infinite; the "
                                  "checkpoint is damaged")
        scale = scales.get(key[: -len(".weight")])
        if scale is not None and not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise BuildInputError(f"model: weight {key}: expected a finite, positive FP8 scale, got {scale.item()}; "
                                  "the checkpoint is damaged")


def calibrate_or_resume(model, recipe: Recipe, samples, steps: int, state_path: Path, stages: StageRecorder, *,
                        remake=None, tmp_dir: Path | None = None, low_vram: bool = False, progress=None,
                        should_cancel=None):
    """The quantized model: from the saved calibrated state if there is an intact one for this request, else by
    calibrating (then saving the state, through tmp_dir, so a later build resumes from it). Returns the model:
    remake() made anew when a damaged state had to be set aside (loading may have quantized the model before it
    failed); without remake, that state's error is raised."""
    if state_path.is_file():
        try:
            stages.run("calibrate (resumed from saved state)",
                       lambda: load_calibrated_state(model, state_path, recipe=recipe))
            return model
        except CalibratedStateError as e:
            if remake is None:
                raise
            log.warning("Kontext TRT: not reusing the calibrated state: %s. Calibrating again.", e)
            stages.stages.pop("calibrate (resumed from saved state)", None)
            model = remake()
    fp8_scales = dict(getattr(model, "fp8_weight_scales", {}))
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
    stages.run("save_calibrated_state", lambda: save_calibrated_state(model, recipe, state_path, tmp_dir=tmp_dir))
    return model


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
