"""Full-size FLUX.1 Kontext [dev] through ComfyUI's own sampling on the PyTorch FP8 backend, on one GPU.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_fp8_sampling.py [--steps 4] [--out result.json]

The loader's path end to end, with random weights: ModelOpt calibrates the fp8 recipe (the Build
node's stage; attention quantized, its default, unless --no-attention), the calibrated state is saved
and read back, load_fp8_transformer builds the FP8 transformer one tensor at a time (FP8 attention by
the fused kernel), its blocks are compiled as the loader's `compile` input does (unless --no-compile),
each step is replayed as one CUDA graph as its `cuda_graph` input does (unless --no-cuda-graph; a
warm-up sample per batch size first, timed as the first sample), backend_model wraps it as ComfyUI's
Flux MODEL, and
comfy.sample.sample runs a 1024^2 edit with a 1024^2 reference latent at CFG 1 and at CFG 2.5
(cond and uncond batched). Reports the FP8 weights' size, peak GPU memory while sampling, what an
unload frees, seconds per step, and the final latent's cosine to ComfyUI's own BF16 Flux on the
same weights and inputs (with the pack's own BF16 transformer on the same path as the drift floor,
and a 1-step run for one model call's error). benchmarks/step_speed.py is the per-step speed benchmark.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from engines import KONTEXT_DEV, random_state_dict, transformer_from_state_dict  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop, default_encoded_pairs  # noqa: E402
from engines.fp8_attention_fa3 import ATTENTION_KERNELS  # noqa: E402
from engines.kernel_ops import autotuned_choices  # noqa: E402
from engines.quantize import output_error, quantize_transformer, use_eager_fp8_fake_quant  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from comfyui_pack import comfy_flux_model  # noqa: E402
from engines.runtime_torch import load_fp8_transformer, transformer_bytes  # noqa: E402

GIB = 2**30


def import_comfyui(path: str):
    sys.path.insert(0, path)
    import comfy.model_management  # noqa: F401  (reads ComfyUI's default arguments: GPU, normal VRAM)
    # nodes/backend_model.py needs only comfy.*; loaded by path since ComfyUI owns the name "nodes".
    spec = importlib.util.spec_from_file_location("kontext_backend_model", ROOT / "nodes" / "backend_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conditioning(seed, reference, cfg):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, cfg.vec_in_dim, generator=g), "guidance": 2.5,
             "reference_latents": [reference]}
    return [[torch.randn(1, 512, cfg.context_in_dim, generator=g), extra]]


def sample(model, cfg, cfg_scale, steps):
    """A 1024^2 edit: 128x128 latent, a 128x128 reference latent, 512 text tokens; (latent, s/step, peak GiB)."""
    import comfy.sample

    g = torch.Generator().manual_seed(42)
    reference = torch.randn(1, 16, 128, 128, generator=g)
    latent = torch.zeros(1, 16, 128, 128)
    noise = comfy.sample.prepare_noise(latent, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg_scale, "euler", "simple", conditioning(1, reference, cfg),
                              conditioning(2, reference, cfg), latent, seed=0, disable_pbar=True)
    torch.cuda.synchronize()
    return out.float().cpu(), (time.perf_counter() - t) / steps, torch.cuda.max_memory_allocated() / GIB


def profile_sample(model, cfg, steps) -> dict:
    """One CFG 1 sample under torch.profiler: how much of its wall time the GPU is busy, and where the rest
    goes (the costliest kernels, and the CPU ops that take longest outside the transformer's step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, step_s, _ = sample(model, cfg, 1.0, steps)
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0, None
    for start, stop in kernels:  # the union of kernel intervals (concurrent kernels counted once)
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90), flush=True)
    span_us = kernels[-1][1] - kernels[0][0] if kernels else 0
    return dict(s_per_step=round(step_s, 4), gpu_busy_ms_per_step=round(busy / 1000 / steps, 2),
                first_to_last_kernel_ms_per_step=round(span_us / 1000 / steps, 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eager-fp8", action="store_true",
                   help="ModelOpt's eager FP8 fake-quant for calibration (same math, no ~1 min CUDA extension build)")
    p.add_argument("--no-attention", action="store_true", help="calibrate without attention quantization")
    p.add_argument("--no-compile", action="store_true", help="run the backend's blocks uncompiled")
    p.add_argument("--no-cuda-graph", action="store_true", help="run each step without the loader's CUDA graph")
    p.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS,
                   help="the loader's attention_kernel input (auto: FlashAttention-3 where built on Hopper)")
    p.add_argument("--profile", action="store_true",
                   help="after timing the FP8 runs, profile one CFG 1 sample (GPU busy vs wall time, costliest "
                        "kernels and CPU ops), then one with the conds copied from CPU every step as ComfyUI's "
                        "own Flux class does, and stop there: no BF16 references, no cosines")
    p.add_argument("--out", default="output/comfyui_fp8_sampling.json")
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("--comfyui or COMFYUI_PATH: a ComfyUI checkout is needed")
    if args.eager_fp8:
        use_eager_fp8_fake_quant()
    backend_model_module = import_comfyui(args.comfyui)
    import comfy.model_management as mm

    device, cfg = mm.get_torch_device(), KONTEXT_DEV
    sd = {k: v.cpu() for k, v in random_state_dict(cfg, seed=0, dtype=torch.bfloat16, device=device).items()}
    torch.cuda.empty_cache()

    # The Build node's calibration stage, on the GPU, then its saved state.
    recipe = load_recipe("fp8", attention=not args.no_attention)
    calibrated = transformer_from_state_dict({k: v.to(device) for k, v in sd.items()})
    pairs = default_encoded_pairs(cfg)[:3]
    quantize_transformer(calibrated, recipe, calibration_forward_loop(pairs, steps=4))
    state = save_calibrated_state(calibrated, recipe, Path(tempfile.mkdtemp()) / "kontext_fp8.calibration.safetensors")
    del calibrated
    gc.collect()
    torch.cuda.empty_cache()
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, steps=args.steps,
                  fp8_attention=not args.no_attention, compiled=not args.no_compile, cuda_graph=not args.no_cuda_graph,
                  attention_kernel=args.attention_kernel,
                  resolution="1024x1024 edit + 1024x1024 reference latent, 512 text tokens (8704 tokens)")

    # The loader's PyTorch backend: weights read one at a time from the (here in-memory) checkpoint.
    base_allocated = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner = load_fp8_transformer(lambda key: sd[key], state, device=device, dtype=torch.bfloat16,
                                  attention_kernel=args.attention_kernel)
    result["fa3_library"] = next((m.fa3_library for m in runner.modules() if hasattr(m, "fa3_library")), None)
    result["fp8_weights_gib"] = round(transformer_bytes(runner) / GIB, 2)
    result["load_peak_gib"] = round((torch.cuda.max_memory_allocated() - base_allocated) / GIB, 2)
    if not args.no_compile:
        from engines.runtime_torch import compile_blocks

        compile_blocks(runner)
    if not args.no_cuda_graph:
        from engines.cuda_graph_step import CUDAGraphedTransformer

        runner = CUDAGraphedTransformer(runner)
    quantized = backend_model_module.backend_model(runner, cfg, transformer_bytes(runner), torch.bfloat16, device,
                                                   torch.device("cpu"))
    if not (args.no_compile and args.no_cuda_graph):
        for cfg_scale in (1.0, 2.5):  # batch 1 and batch 2 (cond + uncond): one compilation and capture each
            t = time.perf_counter()
            sample(quantized, cfg, cfg_scale, 1)
            result[f"fp8_first_sample_cfg{cfg_scale}_s"] = round(time.perf_counter() - t, 1)
            print(f"fp8 first sample (compiles, captures), cfg {cfg_scale}: {time.perf_counter() - t:.1f} s", flush=True)
    runs = ((1.0, args.steps), (2.5, args.steps), (1.0, 1))  # the last: one model call's error, no compounding
    outputs = {}
    for cfg_scale, steps in runs:
        latent, step_s, peak = sample(quantized, cfg, cfg_scale, steps)
        outputs["fp8", cfg_scale, steps] = latent
        result[f"fp8_cfg{cfg_scale}_{steps}steps"] = dict(peak_gib=round(peak, 2), s_per_step=round(step_s, 3))
        print(f"fp8 cfg {cfg_scale}, {steps} steps: peak {peak:.2f} GiB, {step_s:.3f} s/step", flush=True)
    # Which tile configs the autotuners kept here, to compare with step_speed.py's rows: the attention kernel ran
    # slower inside ComfyUI in one profiled run (1.343 against 1.278 ms a call); on 2026-11-23 both kept the same
    # tile, so the pick was not the cause there, but a first-call pick between configs within noise can differ.
    result["autotuned"] = autotuned_choices()
    if args.profile:
        # The loader's MODEL against the same MODEL as ComfyUI's own Flux class holds it (conds copied from CPU
        # memory in every model call): timed in turns, then one profiled sample each.
        import comfy.model_base

        classes = {"loader": quantized.model.__class__, "conds_copied_every_step": comfy.model_base.Flux}
        for turn in range(3):
            for cfg_scale in (1.0, 2.5):
                for name, model_class in classes.items():
                    quantized.model.__class__ = model_class
                    result.setdefault(f"cfg{cfg_scale}_{args.steps}steps_s_per_step_{name}", []).append(
                        round(sample(quantized, cfg, cfg_scale, args.steps)[1], 4))
        for name, model_class in classes.items():
            quantized.model.__class__ = model_class
            result[f"profile_{name}"] = profile_sample(quantized, cfg, args.steps)
        quantized.model.__class__ = classes["loader"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    before = torch.cuda.memory_allocated()
    mm.unload_all_models()
    mm.soft_empty_cache()
    result["unload_freed_gib"] = round((before - torch.cuda.memory_allocated()) / GIB, 2)
    result["allocated_after_unload_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    print(f"unload freed {result['unload_freed_gib']} GiB; {result['allocated_after_unload_gib']} GiB left", flush=True)
    del quantized, runner
    gc.collect()

    # Two BF16 references: ComfyUI's own Flux, and the pack's BF16 transformer behind the same backend path.
    # Their difference is how far BF16 rounding alone drifts over sampling with these random weights.
    pack_bf16 = backend_model_module.backend_model(transformer_from_state_dict(sd), cfg, 0, torch.bfloat16, device,
                                                   torch.device("cpu"))
    original = comfy_flux_model(cfg, sd, torch.bfloat16, load_device=device)
    for name, model in (("comfyui_bf16", original), ("pack_bf16", pack_bf16)):
        for cfg_scale, steps in runs:
            latent, step_s, peak = sample(model, cfg, cfg_scale, steps)
            outputs[name, cfg_scale, steps] = latent
            print(f"{name} cfg {cfg_scale}, {steps} steps: peak {peak:.2f} GiB, {step_s:.3f} s/step", flush=True)
        mm.unload_all_models()
        mm.soft_empty_cache()
    del model, original, pack_bf16
    for cfg_scale, steps in runs:
        ref = outputs["comfyui_bf16", cfg_scale, steps]
        for name in ("fp8", "pack_bf16"):
            cos, rel = output_error(ref, outputs[name, cfg_scale, steps])
            result[f"{name}_vs_comfyui_bf16_cfg{cfg_scale}_{steps}steps"] = dict(cosine=round(cos, 5), rel_l2=round(rel, 4))
            print(f"{name} vs ComfyUI BF16, cfg {cfg_scale}, {steps} steps: final latent cosine {cos:.5f}, "
                  f"relative L2 {rel:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
