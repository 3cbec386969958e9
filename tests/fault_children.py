"""Child processes for the fault-injection tests: a real build of the tiny model (ModelOpt calibration, ONNX export,
TensorRT-RTX's CPU builder) that kills itself with SIGKILL at a chosen point, or pauses there until told to go on.

They are started from a forkserver that has imported torch, ModelOpt and TensorRT-RTX once, so a child costs its
build, not ten seconds of imports; a forkserver never ran torch, so its children start with no OpenMP threads to
lose in the fork.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import torch

PRELOAD = ["torch", "modelopt.torch.quantization", "tensorrt_rtx", "engines.build", "engines.onnx_export",
           "quant_helpers", "fault_children"]
SM89 = (8, 9)
# How long a paused child waits for the test's go-ahead; only a hung test ever reaches it.
PAUSE_LIMIT_S = 600


def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@functools.lru_cache(maxsize=4)
def tiny_inputs(pairs_dir: str):
    """The same request in every process: seeded weights and the default calibration set drawn at 128 px (shared
    within a process: a build never modifies them)."""
    from engines import random_state_dict
    from quant_helpers import CFG, encoded_pairs

    return random_state_dict(CFG, dtype=torch.float16), encoded_pairs(Path(pairs_dir), n=2)


def build(store_root: Path, pairs_dir: Path, attention: bool = True, pairs=None, **kw):
    from engines.build import build_kontext_engine
    from engines.engine_store import EngineStore
    from engines.recipes import load_recipe
    from engines.shape_profiles import named_profile
    from engines.tensorrt_build import import_tensorrt

    sd, default_pairs = tiny_inputs(str(pairs_dir))
    return build_kontext_engine(sd, load_recipe("fp8", attention=attention), [named_profile("kontext_1ref")],
                                pairs or default_pairs, steps=2, store=EngineStore(store_root), compute_capability=SM89,
                                trt=import_tensorrt("tensorrt_rtx"), **kw)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_write(module, suffix: str):
    """module.write_atomically whose write of a file named *suffix completes into the temporary file, then dies
    before the rename."""
    real = module.write_atomically

    def write_atomically(path, write, *args, **kw):
        if not str(path).endswith(suffix):
            return real(path, write, *args, **kw)

        def write_then_die(tmp):
            write(tmp)
            die()
        return real(path, write_then_die, *args, **kw)
    module.write_atomically = write_atomically


def build_and_die(store_root: str, pairs_dir: str, kill_at: str) -> None:
    """A build killed with SIGKILL at `kill_at`:
    calibrate          after the first calibration pair
    save_state         the calibrated state written to its temporary file, not renamed
    after_export       the ONNX exported, TensorRT not started
    build_engine       inside TensorRT's build (its first progress step)
    save_engine        the engine written to its temporary file, not renamed
    save_sidecar       the engine in place, its sidecar written to its temporary file, not renamed
    """
    import engines.build
    import engines.calibrated_state
    import engines.engine_store

    def progress(stage, done, total):
        if stage == kill_at:  # "calibrate" and "build_engine" are progress stages
            die()

    if kill_at == "save_state":
        _kill_in_write(engines.calibrated_state, ".calibration.safetensors")
    elif kill_at == "after_export":
        real_export = engines.build.export_onnx

        def export_then_die(*a, **k):
            real_export(*a, **k)
            die()
        engines.build.export_onnx = export_then_die
    elif kill_at == "save_engine":
        _kill_in_write(engines.engine_store, ".engine")
    elif kill_at == "save_sidecar":
        _kill_in_write(engines.engine_store, ".json")
    elif kill_at not in ("calibrate", "build_engine"):
        raise ValueError(f"kill_at: unknown point {kill_at!r}")
    build(Path(store_root), Path(pairs_dir), progress=progress)
    raise AssertionError(f"the build finished although it was to be killed at {kill_at}")


def build_and_report(store_root: str, pairs_dir: str, signals: str, name: str, pause_after_first_pair: bool) -> None:
    """A build that writes `<signals>/<name>.json` with its result, `<name>.built` each time it runs TensorRT's
    builder, `<name>.waiting` when it finds another build of its request running, and, with
    pause_after_first_pair, `<name>.paused` after its first calibration pair, then waits for `<signals>/go`."""
    import engines.build

    signals = Path(signals)
    real_builder = engines.build.build_engine

    def counting_builder(*a, **k):
        (signals / f"{name}.built").touch()
        return real_builder(*a, **k)
    engines.build.build_engine = counting_builder

    def progress(stage, done, total):
        if stage == "calibrate" and done == 1 and pause_after_first_pair:
            (signals / f"{name}.paused").touch()
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while not (signals / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif stage.startswith("waiting"):
            (signals / f"{name}.waiting").touch()

    result = build(Path(store_root), Path(pairs_dir), progress=progress)
    (signals / f"{name}.json").write_text(json.dumps({"engine": str(result.engine), "cached": result.cached}))


def export_and_die(checkpoint: str, state: str, out: str) -> None:
    """A checkpoint export (comfy_export) killed with SIGKILL once it has written its header and first tensor."""
    import engines.comfy_export
    from engines.source_weights import open_checkpoint

    real_write = engines.comfy_export.write_safetensors

    def write_then_die(path, entries, metadata):
        real_write(path, entries[:1], metadata)
        die()
    engines.comfy_export.write_safetensors = write_then_die
    with open_checkpoint(checkpoint) as weights:
        engines.comfy_export.export_comfy_checkpoint(weights, state, out)
    raise AssertionError("the export finished although it was to be killed")
