"""Per-recipe output error against BF16 at full FLUX.1 Kontext [dev] size, on one NVIDIA GPU.

    python benchmarks/accuracy_report.py [--checkpoint flux1-kontext-dev.safetensors] [--recipes fp8,fp8+attn,...]

With no checkpoint the transformer has random weights (the shapes and the trajectory are real,
the numbers are not a quality claim for trained weights). Calibration pairs are the pack's default
set, encoded by StandInEncoder (no text encoder or VAE here); error is measured on held-out pairs,
one edit step per sigma, 1024^2 target + 1024^2 reference + 512 text tokens (8704 per attention).
Prints a markdown table and writes JSON.

--runtime also measures, for the fp8 recipes, the PyTorch backend the loader builds from the
calibrated state (real FP8 GEMMs and, with +attn, the fused FP8 attention kernel): its error against
BF16 and against ModelOpt's calibrated (fake-quant) model it stands for.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import KONTEXT_DEV, random_state_dict, transformer_from_state_dict  # noqa: E402
from engines.state_dict import read_checkpoint  # noqa: E402
from engines.accuracy import error_table, step_outputs  # noqa: E402
from engines.calibration import calibration_forward_loop, default_encoded_pairs  # noqa: E402
from engines.quantize import quantize_transformer, use_eager_fp8_fake_quant  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402

# A variant is a recipe name or .json path, "+attn" to quantize attention as the recipe says.
VARIANTS = ("fp8", "fp8+attn", "nvfp4+attn", "svdquant_nvfp4+attn")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--recipes", default=",".join(VARIANTS), help=f"comma list of recipes, '+attn' to quantize attention too (default {','.join(VARIANTS)})")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--calib-pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="sampling steps per calibration pair")
    p.add_argument("--eval-pairs", type=int, default=2)
    p.add_argument("--sigmas", default="0.9,0.7,0.5,0.3,0.1")
    p.add_argument("--eager-fp8", action="store_true",
                   help="ModelOpt's eager FP8 fake-quant (same math) instead of compiling its CUDA extension (~1 min)")
    p.add_argument("--runtime", action="store_true",
                   help="fp8 recipes: also the PyTorch backend built from the calibrated state (see above)")
    p.add_argument("--out", default="output/accuracy_report.json")
    args = p.parse_args(argv)
    if args.eager_fp8:
        use_eager_fp8_fake_quant()
    sigmas = tuple(float(s) for s in args.sigmas.split(","))
    device = "cuda"

    t0 = time.perf_counter()
    if args.checkpoint:
        sd = read_checkpoint(args.checkpoint, torch.bfloat16, device)
        source = Path(args.checkpoint).name
    else:
        sd = random_state_dict(KONTEXT_DEV, seed=0, dtype=torch.bfloat16, device=device)
        source = "random weights"
    base = transformer_from_state_dict(sd)
    cfg = base.config
    pairs = default_encoded_pairs(cfg, args.size)
    calib, held = pairs[:args.calib_pairs], pairs[-args.eval_pairs:]
    reference = step_outputs(base, held, sigmas)
    del base
    print(f"model ready ({source}) in {time.perf_counter() - t0:.0f} s; "
          f"{held[0].reference.shape[1] * 2 + 512} tokens per attention", flush=True)

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, source=source, size=args.size,
               calib_pairs=len(calib), steps=args.steps, eval_pairs=len(held), sigmas=sigmas)
    try:
        import modelopt
        env["modelopt"] = modelopt.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.recipes.split(","):
        attention = name.endswith("+attn")
        recipe = load_recipe(name.removesuffix("+attn"), attention=attention)
        recipe_name = recipe.name
        torch.cuda.reset_peak_memory_stats()
        model = transformer_from_state_dict(sd)
        t = time.perf_counter()
        report = quantize_transformer(model, recipe, calibration_forward_loop(calib, steps=args.steps))
        calib_s = time.perf_counter() - t
        fake_quant = step_outputs(model, held, sigmas)
        rows = error_table(reference, fake_quant)
        results.append(dict(variant=name, recipe=recipe_name, attention=attention, calibration_s=round(calib_s, 1),
                            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                            linear_quantized=len(report.linear_quantized), linear_16bit=len(report.linear_16bit),
                            counts=report.counts, rows=[r.__dict__ for r in rows]))
        print(f"{name}: calibrated in {calib_s:.0f} s; " + ", ".join(
            f"sigma {r.sigma}: cos {r.cosine_min:.4f} relL2 {r.rel_l2_mean:.4f}" for r in rows), flush=True)
        if args.runtime and recipe_name == "fp8":
            results.append(runtime_rows(name, model, recipe, sd, held, sigmas, reference, fake_quant))
        Path(args.out).write_text(json.dumps(dict(env=env, results=results), indent=2))  # each variant as it ends
        del model
        gc.collect()
        torch.cuda.empty_cache()

    print(markdown(env, results))
    return 0


def runtime_rows(name, model, recipe, sd, held, sigmas, reference, fake_quant) -> dict:
    """The PyTorch backend from `model`'s calibrated state: error vs BF16, and vs the fake-quant model."""
    import tempfile

    from engines.calibrated_state import save_calibrated_state
    from engines.runtime_torch import load_fp8_transformer

    state = save_calibrated_state(model, recipe, Path(tempfile.mkdtemp()) / "s.calibration.safetensors")
    backend = load_fp8_transformer(sd.__getitem__, state, device="cuda", dtype=torch.bfloat16)
    got = step_outputs(backend, held, sigmas)
    rows = error_table(reference, got)
    vs_fake_quant = error_table(fake_quant, got)
    print(f"{name} PyTorch backend: " + ", ".join(
        f"sigma {r.sigma}: cos {r.cosine_min:.4f} (vs fake-quant {v.cosine_min:.4f})"
        for r, v in zip(rows, vs_fake_quant)), flush=True)
    del backend
    return dict(variant=f"{name} (PyTorch backend)", recipe=recipe.name, attention=recipe.attention is not None,
                rows=[r.__dict__ for r in rows], vs_fake_quant=[r.__dict__ for r in vs_fake_quant])


def markdown(env, results) -> str:
    head = "| variant | " + " | ".join(f"cos / relL2 @ sigma {s}" for s in env["sigmas"]) + " |"
    lines = [f"{env['gpu']}, torch {env['torch']}, ModelOpt {env.get('modelopt', '?')}, {env['source']}, "
             f"{env['size']}^2 + {env['size']}^2 reference, {env['calib_pairs']} calibration pairs x "
             f"{env['steps']} steps, {env['eval_pairs']} held-out pairs (worst cosine, mean relative L2)", "",
             head, "|---" * (len(env["sigmas"]) + 1) + "|"]
    for r in results:
        cells = [f"{row['cosine_min']:.4f} / {row['rel_l2_mean']:.3f}" for row in r["rows"]]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
