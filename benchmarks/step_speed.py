"""Per-step speed of the Kontext transformer on one GPU, every variant in one run, against ComfyUI's BF16.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/step_speed.py [--variants ...] [--batch 1,2] [--sizes 1024]

One step = one transformer call at a 1024^2-class edit with one same-size reference (8192 image
tokens + 512 text tokens), random weights (the speed does not depend on them). Reports per variant:
median ms per step over --iters calls after warm-up (CUDA events), the ratio to ComfyUI BF16 eager,
peak GPU memory, the output's cosine to ComfyUI BF16 eager, and the time to the first step (load,
compile, calibration excluded from neither). No test asserts any of this; the README quotes the JSON.

Variants so far (issue 7 adds the fused FP8 attention kernel, NVFP4 and CUDA graphs):
  comfy_bf16          ComfyUI's Flux (comfy.ldm.flux.model.Flux), BF16, eager
  comfy_bf16_compile  the same under torch.compile (per block)
  pack_bf16           this pack's transformer, BF16, eager
  pack_fp8            the PyTorch backend: FP8 GEMMs (torch._scaled_mm, static calibrated scales), eager
  pack_fp8_compile    the same, each block under torch.compile (activation quantization fused into the
                      producers by Inductor), attention BF16 SDPA (cuDNN)
  pack_fp8_cudagraphs the same with mode="reduce-overhead": each block replayed as a CUDA graph
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engines import KONTEXT_DEV, random_state_dict, transformer_from_state_dict  # noqa: E402
from engines.quantize import output_error, use_eager_fp8_fake_quant  # noqa: E402
from engines.tokens import edit_ids  # noqa: E402

GIB = 2**30
VARIANTS = ("comfy_bf16", "comfy_bf16_compile", "pack_bf16", "pack_fp8", "pack_fp8_compile", "pack_fp8_cudagraphs")


def step_inputs(size: int, batch: int, device):
    side = size // 16  # latent tokens per side
    g = torch.Generator().manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    return dict(img=torch.randn(batch, 2 * side * side, 64, generator=g).to(**bf),
                img_ids=edit_ids((side, side), [(side, side)])[None].expand(batch, -1, -1).to(device),
                txt=torch.randn(batch, 512, 4096, generator=g).to(**bf),
                txt_ids=torch.zeros(batch, 512, 3, device=device),
                timesteps=torch.full((batch,), 0.7, device=device),
                y=torch.randn(batch, 768, generator=g).to(**bf),
                guidance=torch.full((batch,), 2.5, device=device))


def comfy_flux(sd, cfg, device):
    """ComfyUI's own Flux module (what its KSampler runs), BF16, on the GPU."""
    from comfyui_pack import comfy_flux_model

    return comfy_flux_model(cfg, sd, torch.bfloat16).model.diffusion_model.to(device).eval()


def fp8_model(sd, device):
    """The PyTorch backend exactly as the loader builds it, with max-calibrated scales from one pass
    (calibration quality does not change the speed)."""
    import tempfile

    from engines.calibrated_state import save_calibrated_state
    from engines.calibration import calibration_forward_loop, default_encoded_pairs
    from engines.quantize import quantize_transformer
    from engines.recipes import load_recipe
    from engines.runtime_torch import load_fp8_transformer

    recipe = load_recipe("fp8", attention=False)
    model = transformer_from_state_dict(sd)
    pairs = default_encoded_pairs(model.config)[:1]
    quantize_transformer(model, recipe, calibration_forward_loop(pairs, steps=2))
    state = save_calibrated_state(model, recipe, Path(tempfile.mkdtemp()) / "s.calibration.safetensors")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return load_fp8_transformer(lambda k: sd[k], state, device=device, dtype=torch.bfloat16)


def compile_blocks(model, mode=None):
    """torch.compile per block: the 19 double and 38 single blocks share two graphs, so Inductor compiles
    twice, not 57 times, and no whole-model graph has to be traced."""
    for block in list(model.double_blocks) + list(model.single_blocks):
        block.compile(mode=mode)
    return model


def make_variant(name: str, sd: dict, cfg, device):
    """A callable taking step_inputs(...) -> output tokens."""
    if name in ("comfy_bf16", "comfy_bf16_compile"):
        module = comfy_flux(sd, cfg, device)
        if name.endswith("_compile"):
            compile_blocks(module)
        return lambda x: module.forward_orig(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                             x["guidance"])
    gpu_sd = {k: v.to(device) for k, v in sd.items()}
    if name == "pack_bf16":
        model = transformer_from_state_dict(gpu_sd)
    elif name in ("pack_fp8", "pack_fp8_compile", "pack_fp8_cudagraphs"):
        model = fp8_model(gpu_sd, device)
        del gpu_sd
        if name.endswith("_compile"):
            compile_blocks(model)
        elif name.endswith("_cudagraphs"):
            compile_blocks(model, mode="reduce-overhead")
    else:
        raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if name.endswith("_cudagraphs"):
        def step(x):
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous step's graph outputs may be reused
            return model(**x)
        return step
    return lambda x: model(**x)


def time_steps(fn, x, warmup: int, iters: int) -> tuple[float, float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(x)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], first, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", default="1")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step of each variant and print its 20 costliest kernels")
    p.add_argument("--out", default="output/step_speed.json")
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("--comfyui or COMFYUI_PATH: a ComfyUI checkout (its Flux is the baseline)")
    sys.path.insert(0, args.comfyui)
    use_eager_fp8_fake_quant()  # the calibration pass only sets scales; no ~1 min extension build

    device, cfg = torch.device("cuda"), KONTEXT_DEV
    sd = {k: v.cpu() for k, v in random_state_dict(cfg, seed=0, dtype=torch.bfloat16, device=device).items()}
    torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), size=args.size, tokens=2 * (args.size // 16) ** 2 + 512)
    rows, reference = [], {}
    for batch in (int(b) for b in args.batch.split(",")):
        x = step_inputs(args.size, batch, device)
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            fn = make_variant(name, sd, cfg, device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the step's peak: weights + activations, not the set-up
            setup_s = time.perf_counter() - t0
            ms, first_s, out = time_steps(fn, x, args.warmup, args.iters)
            out = out.float().cpu()
            if name == "comfy_bf16":
                reference[batch] = out
            cos = output_error(reference[batch], out)[0] if batch in reference else None
            row = dict(variant=name, batch=batch, ms_per_step=round(ms, 1), peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                       cosine_to_comfy_bf16=None if cos is None else round(cos, 5),
                       setup_s=round(setup_s, 1), first_step_s=round(first_s, 2))
            rows.append(row)
            base = next((r["ms_per_step"] for r in rows if r["variant"] == "comfy_bf16" and r["batch"] == batch), None)
            row["speedup_vs_comfy_bf16"] = round(base / ms, 2) if base else None
            print(json.dumps(row), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(x)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70),
                      flush=True)
            fn = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print("| variant | batch | ms/step | vs ComfyUI BF16 | peak GiB | cosine | first step s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']} | {r['speedup_vs_comfy_bf16']}x | {r['peak_gib']} | "
              f"{r['cosine_to_comfy_bf16']} | {r['first_step_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
