"""Time and peak memory of each build stage at full FLUX.1 Kontext [dev] size, on one NVIDIA GPU.

    python benchmarks/build_stages.py --mode normal|low_vram [--recipe fp8] [--no-attention]

Runs the pack's own stage functions (engines.build): calibrate, save the calibrated state, export
ONNX. The TensorRT build is not run here (this script is for machines without TensorRT); its
cost is reported by the build node into each engine's sidecar. Random weights unless --checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import KONTEXT_DEV, random_state_dict, transformer_from_state_dict  # noqa: E402
from engines.build import StageRecorder, calibrate_or_resume, export_stage  # noqa: E402
from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("normal", "low_vram"), default="normal")
    p.add_argument("--recipe", default="fp8")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--calib-pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="output/build_stages.json")
    args = p.parse_args(argv)
    low_vram = args.mode == "low_vram"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kontext_stages_"))
    work.mkdir(parents=True, exist_ok=True)

    stages = StageRecorder(cuda=True)
    t = time.perf_counter()
    sd = random_state_dict(KONTEXT_DEV, dtype=torch.bfloat16, device="cuda")
    if low_vram:  # the weights live in system memory, as ComfyUI keeps them when they do not fit the card
        sd = {k: v.cpu() for k, v in sd.items()}
        torch.cuda.empty_cache()
    stages.stages["load_random_weights"] = {"seconds": round(time.perf_counter() - t, 1)}
    model = transformer_from_state_dict(sd)
    pairs = [StandInEncoder(KONTEXT_DEV)(pair, 1024)
             for pair in read_calibration_set(write_default_calibration_set(work / "calib"))][:args.calib_pairs]
    recipe = load_recipe(args.recipe, attention=not args.no_attention)
    state = work / "state.safetensors"
    calibrate_or_resume(model, recipe, pairs, args.steps, state, stages, low_vram=low_vram)
    onnx_path = work / "onnx" / "kontext.onnx"
    onnx_path.parent.mkdir(exist_ok=True)
    export_stage(model, onnx_path, stages)
    sizes = {"calibrated_state_mib": round(state.stat().st_size / 2**20, 1),
             "onnx_gib": round(sum(f.stat().st_size for f in onnx_path.parent.iterdir()) / 2**30, 2)}
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, mode=args.mode, recipe=recipe.name,
               attention=recipe.attention is not None, calib_pairs=len(pairs), steps=args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, stages=stages.stages, sizes=sizes), indent=2))
    print(json.dumps(dict(env=env, stages=stages.stages, sizes=sizes), indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
