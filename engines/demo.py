"""The pack's main job without ComfyUI: one Kontext edit's denoising loop through the transformer.

    python -m engines.demo [--checkpoint flux1-kontext-dev.safetensors] [--steps 20]

With a checkpoint (or $KONTEXT_CHECKPOINT) it loads the real transformer; with none it runs the
embedded tiny random-weight Kontext, so the whole path runs on any CPU. It samples the target
tokens of an edit from noise with the reference tokens alongside (Euler, flow matching, the way
ComfyUI's sampler steps Flux), and reports time per step and the output's statistics as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .config import tiny_config
from .sampling import euler_edit
from .state_dict import random_state_dict, read_checkpoint, transformer_from_state_dict
from .tokens import example_inputs, tokens_for_pixels


def load_transformer(checkpoint: str | None, device: str, dtype: torch.dtype):
    if checkpoint:
        return transformer_from_state_dict(read_checkpoint(checkpoint, dtype, device)), f"checkpoint {Path(checkpoint).name}"
    cfg = tiny_config()
    sd = {k: v.to(device) for k, v in random_state_dict(cfg, dtype=dtype).items()}
    return transformer_from_state_dict(sd), "embedded tiny random-weight Kontext (no checkpoint given)"


@torch.no_grad()
def run_edit(model, size: int, steps: int, seed: int, device: str) -> dict:
    cfg = model.config
    grid = tokens_for_pixels(size, size)
    n_txt = 64 if cfg.context_in_dim < 4096 else 512
    x = example_inputs(cfg, batch=1, target=grid, references=[grid], n_txt=n_txt, seed=seed,
                       dtype=model.dtype, device=device)
    n_target = grid[0] * grid[1]
    reference = x["img"][:, n_target:]  # stands for the encoded source image
    times = []

    def timed_model(*args):
        start = time.perf_counter()
        out = model(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    latent = euler_edit(timed_model, x["txt"], x["txt_ids"], x["y"], reference, x["img_ids"], n_target,
                        steps, guidance=2.5, seed=seed + 1)
    return dict(tokens=dict(target=n_target, reference=reference.shape[1], text=n_txt),
                steps=steps, ms_per_step_median=1000 * sorted(times)[len(times) // 2],
                first_step_ms=1000 * times[0], output_mean=latent.float().mean().item(),
                output_std=latent.float().std().item(), finite=bool(torch.isfinite(latent).all()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=os.environ.get("KONTEXT_CHECKPOINT"),
                        help="FLUX.1 Kontext [dev] transformer .safetensors (default: $KONTEXT_CHECKPOINT, else tiny)")
    parser.add_argument("--size", type=int, default=None, help="edit size in pixels (default 1024 real, 256 tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="output/demo_report.json")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, source = load_transformer(args.checkpoint, args.device, dtype)
    size = args.size or (1024 if args.checkpoint else 256)
    report = dict(model=source, device=args.device, dtype=str(dtype), size=size,
                  **run_edit(model, size, args.steps, args.seed, args.device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if report["finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
