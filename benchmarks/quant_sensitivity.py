"""Which layers cost a recipe its accuracy: calibrate once, then put one group of Linears back in 16-bit
at a time and measure the output error again, at full FLUX.1 Kontext [dev] size on one NVIDIA GPU.

    python benchmarks/quant_sensitivity.py [--recipes fp8,nvfp4] [--checkpoint ...] [--save-state DIR]

Toggling quantizers off needs no recalibration (the other layers keep their calibrated scales), so
each group costs two forward passes per held-out pair. The numbers are the upper bound of what
keeping a group out of the recipe's format buys; they guide the recipes' weight_only / keep_16bit /
overrides sections. Random weights unless a checkpoint is given (same caveats as accuracy_report.py).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import KONTEXT_DEV, random_state_dict, tiny_config, transformer_from_state_dict  # noqa: E402
from engines.accuracy import error_table, step_outputs  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.state_dict import read_checkpoint  # noqa: E402
from engines.calibration import calibration_forward_loop, default_encoded_pairs  # noqa: E402
from engines.quantize import quantize_transformer, use_eager_fp8_fake_quant  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402

# name -> Linear-name patterns (BFL names). "inputs:" groups switch off only the activation quantizers.
GROUPS = {
    "double img qkv": ["double_blocks.*.img_attn.qkv"],
    "double img proj": ["double_blocks.*.img_attn.proj"],
    "double img mlp up": ["double_blocks.*.img_mlp.0"],
    "double img mlp down": ["double_blocks.*.img_mlp.2"],
    "double txt (all)": ["double_blocks.*.txt_*"],
    "single linear1 (qkv+mlp up)": ["single_blocks.*.linear1"],
    "single linear2 (proj+mlp down)": ["single_blocks.*.linear2"],
    "modulation": ["*_mod.lin", "*.modulation.lin"],
    "first double block": ["double_blocks.0.*"],
    "last double block": ["double_blocks.18.*"],
    "first single block": ["single_blocks.0.*"],
    "last 2 single blocks": ["single_blocks.36.*", "single_blocks.37.*"],
    "inputs: single linear2": ["single_blocks.*.linear2"],
    "inputs: double mlp down": ["double_blocks.*.img_mlp.2", "double_blocks.*.txt_mlp.2"],
    "inputs: all": ["*"],
}


def toggled(model, patterns, inputs_only):
    """Quantizers of the matching Linears that were enabled; the caller disables and re-enables them."""
    found = []
    for name, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        kinds = ("input_quantizer",) if inputs_only else ("input_quantizer", "weight_quantizer")
        found += [q for k in kinds if (q := getattr(module, k, None)) is not None and q.is_enabled]
    return found


def worst_cosine(reference, outputs, sigma):
    at_sigma = {k: v for k, v in reference.items() if k[1] == sigma}
    return min(r.cosine_min for r in error_table(at_sigma, outputs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--recipes", default="fp8,nvfp4", help="recipe names or .json paths; '+attn' quantizes attention too")
    p.add_argument("--calib-pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-pairs", type=int, default=2)
    p.add_argument("--sigmas", default="0.9,0.7,0.5,0.3,0.1", help="the full table's sigmas")
    p.add_argument("--probe-sigma", type=float, default=0.9, help="sigma at which each group is probed")
    p.add_argument("--groups", default=",".join(GROUPS), help="comma list of group names")
    p.add_argument("--eager-fp8", action="store_true",
                   help="ModelOpt's eager FP8 fake-quant (same math) instead of compiling its CUDA extension (~1 min)")
    p.add_argument("--save-state", default=None, help="folder to save each recipe's calibrated state in")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random model on the CPU, 64^2 images")
    p.add_argument("--out", default="output/quant_sensitivity.json")
    args = p.parse_args(argv)
    if args.eager_fp8:
        use_eager_fp8_fake_quant()
    sigmas = tuple(float(s) for s in args.sigmas.split(","))

    t0 = time.perf_counter()
    device, size = ("cpu", 64) if args.tiny else ("cuda", 1024)
    if args.tiny:
        sd = random_state_dict(tiny_config(), seed=0, dtype=torch.float32)
    elif args.checkpoint:
        sd = read_checkpoint(args.checkpoint, torch.bfloat16, "cuda")
    else:
        sd = random_state_dict(KONTEXT_DEV, seed=0, dtype=torch.bfloat16, device=device)
    base = transformer_from_state_dict(sd)
    pairs = default_encoded_pairs(base.config, size, n_txt=16 if args.tiny else 512)
    calib, held = pairs[:args.calib_pairs], pairs[-args.eval_pairs:]
    reference = step_outputs(base, held, sigmas)
    del base
    print(f"model and reference ready in {time.perf_counter() - t0:.0f} s", flush=True)

    results = []
    for name in args.recipes.split(","):
        recipe = load_recipe(name.removesuffix("+attn"), attention=name.endswith("+attn"))
        model = transformer_from_state_dict(sd)
        t = time.perf_counter()
        report = quantize_transformer(model, recipe, calibration_forward_loop(calib, steps=args.steps))
        calib_s = time.perf_counter() - t
        rows = error_table(reference, step_outputs(model, held, sigmas))
        print(f"{name}: calibrated in {calib_s:.0f} s; " + ", ".join(
            f"sigma {r.sigma}: cos {r.cosine_min:.5f}" for r in rows), flush=True)
        if args.save_state:
            save_calibrated_state(model, recipe, Path(args.save_state) / f"{recipe.name}.calibration.safetensors")
        probes = []
        for group in args.groups.split(","):
            quantizers = toggled(model, GROUPS[group], inputs_only=group.startswith("inputs:"))
            for q in quantizers:
                q.disable()
            cos = worst_cosine(reference, step_outputs(model, held, [args.probe_sigma]), args.probe_sigma)
            for q in quantizers:
                q.enable()
            probes.append(dict(group=group, quantizers_off=len(quantizers), cosine_min=cos))
            print(f"  {group:34s} {len(quantizers):4d} quantizers off -> cos {cos:.5f}", flush=True)
        results.append(dict(variant=name, calibration_s=round(calib_s, 1), counts=report.counts,
                            rows=[r.__dict__ for r in rows], probe_sigma=args.probe_sigma, probes=probes))
        del model
        torch.cuda.empty_cache()

    env = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
               source=Path(args.checkpoint).name if args.checkpoint else "random weights",
               calib_pairs=len(calib), steps=args.steps, eval_pairs=len(held), eager_fp8=args.eager_fp8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, results=results), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
