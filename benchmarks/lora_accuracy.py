"""LoRA on the FP8 model, two ways, against the 16-bit model with the LoRAs merged (the reference):

- branch: the PyTorch backend's way (engines/lora.py): FP8 weights untouched, a 16-bit low-rank branch beside
  each patched GEMM on the layer's 16-bit input;
- requantized: each patched FP8 weight dequantized, the LoRAs merged in, and quantized again with a fresh
  per-tensor scale (amax / 448), the activation scales as calibrated (what ComfyUI does to its own FP8 layers).

    python benchmarks/lora_accuracy.py [--config tiny|small] [--magnitudes 0.05,0.2,0.5] [--out ...]

Random weights and random LoRAs on a CPU: two LoRAs stacked at 0.8 and -0.5 (rank 16 and 8) on every FP8 Linear
of the blocks, each LoRA's product `magnitude` times the weight's norm. Speed is not measured (CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import random_state_dict, tiny_config, transformer_from_state_dict  # noqa: E402
from engines.accuracy import error_table, step_outputs  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop, default_encoded_pairs  # noqa: E402
from engines.fp8 import FP8_MAX, quantize_fp8  # noqa: E402
from engines.lora import KeyPatches, LoRAApplier, LowRankPatch, merged_state_dict, random_lora  # noqa: E402
from engines.quantize import quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.runtime_torch import FP8Linear, load_fp8_transformer, modulation_linears  # noqa: E402

CONFIGS = {"tiny": tiny_config(),
           "small": tiny_config(hidden_size=256, num_heads=4, axes_dim=(8, 28, 28), depth=2, depth_single_blocks=4)}


def stacked_patches(sd, keys, magnitude):
    patches = {}
    for rank, strength, seed in ((16, 0.8, 1), (8, -0.5, 2)):
        for key, (up, down) in random_lora(sd, keys, rank, seed, magnitude).items():
            patches.setdefault(key, []).append(LowRankPatch(up, down, strength))
    return patches


@torch.no_grad()
def requantize_merged(model, patches):
    """Each patched FP8 weight := quantize(dequantize(weight) + its LoRAs) with a fresh per-tensor scale."""
    fused = model.fused_modulation
    rows = dict(zip(modulation_linears(model), fused.weight.split(fused.sizes))) if fused is not None else {}
    for i, name in enumerate(modulation_linears(model) if fused is not None else []):
        key = f"{name}.weight"
        if key in patches:
            w = merged_state_dict({key: rows[name].float() * fused.scales[i]}, {key: patches[key]})[key]
            scale = w.abs().max() / FP8_MAX
            rows[name].copy_(quantize_fp8(w, scale))
            fused.scales[i] = scale
    if fused is not None:
        fused.row_scales.copy_(torch.repeat_interleave(fused.scales, torch.tensor(fused.sizes)))
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, FP8Linear) and key in patches:
            w = merged_state_dict({key: module.weight.float() * module.weight_scale}, {key: patches[key]})[key]
            module.weight_scale.copy_(w.abs().max() / FP8_MAX)
            module.weight.copy_(quantize_fp8(w, module.weight_scale))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--magnitudes", default="0.05,0.2,0.5")
    p.add_argument("--sigmas", default="0.9,0.5,0.1")
    p.add_argument("--out", default="output/lora_accuracy.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    cfg = CONFIGS[args.config]
    sigmas = tuple(float(s) for s in args.sigmas.split(","))
    sd = random_state_dict(cfg, seed=0)
    pairs = default_encoded_pairs(cfg, 128, n_txt=16)
    calib, held = pairs[:3], pairs[-3:]
    recipe = load_recipe("fp8", attention=True)
    fake_quant = transformer_from_state_dict({k: v.clone() for k, v in sd.items()})
    quantize_transformer(fake_quant, recipe, calibration_forward_loop(calib, steps=2))
    state = save_calibrated_state(fake_quant, recipe, Path(tempfile.mkdtemp()) / "state.safetensors")
    del fake_quant

    def backend():
        return load_fp8_transformer(lambda k: sd[k].clone(), state, dtype=torch.float32)

    plain = backend()
    applier = LoRAApplier(plain)
    fp8_keys = [k for k in applier.keys() if applier.is_fp8(k)]
    no_lora = error_table(step_outputs(transformer_from_state_dict(sd), held, sigmas), step_outputs(plain, held, sigmas))
    results = {"no LoRA (quantization alone)": [r.__dict__ for r in no_lora]}
    print(f"{args.config}: {len(fp8_keys)} FP8 weights; no LoRA: " +
          ", ".join(f"sigma {r.sigma} rel {r.rel_l2_mean:.4f}" for r in no_lora), flush=True)
    for magnitude in (float(m) for m in args.magnitudes.split(",")):
        patches = stacked_patches(sd, fp8_keys, magnitude)
        reference = step_outputs(transformer_from_state_dict(merged_state_dict(sd, patches)), held, sigmas)
        branch = backend()
        LoRAApplier(branch).apply({k: KeyPatches(tuple(v), lambda w: w) for k, v in patches.items()})
        requantized = backend()
        requantize_merged(requantized, patches)
        rows = {name: error_table(reference, step_outputs(model, held, sigmas))
                for name, model in (("branch", branch), ("requantized", requantized))}
        dropped = error_table(reference, step_outputs(plain, held, sigmas))
        results[f"magnitude {magnitude}"] = {**{k: [r.__dict__ for r in v] for k, v in rows.items()},
                                             "LoRA dropped": [r.__dict__ for r in dropped]}
        for name, table in (*rows.items(), ("LoRA dropped", dropped)):
            print(f"  magnitude {magnitude} {name:12s} " + ", ".join(
                f"sigma {r.sigma}: cos {r.cosine_min:.5f} rel {r.rel_l2_mean:.4f}" for r in table), flush=True)
    env = dict(device="cpu", torch=torch.__version__, config=args.config, model_config=cfg.to_dict(),
               loras="two stacked: rank 16 at 0.8, rank 8 at -0.5, on every FP8 Linear", weights="random",
               calib_pairs=len(calib), eval_pairs=len(held), seconds=round(time.perf_counter() - t0, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, results=results), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
