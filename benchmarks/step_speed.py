"""Per-step speed of the Kontext transformer on one GPU, every variant in one run, against ComfyUI's BF16.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/step_speed.py [--variants ...] [--batch 1,2]
        [--shapes 1024r,1024,512r,512,1392r,1392] [--checkpoint flux1-kontext-dev.safetensors]

One step = one transformer call. A shape is the edit's side in pixels, with "r" for one same-size
reference image (1024r: 4096 + 4096 image tokens + 512 text tokens = 8704; --text-tokens 256, what ComfyUI
sends for a prompt of up to 256 T5 tokens: 8448), at sigma 0.7 on a held-out
pair of the default calibration set. Random weights unless --checkpoint is given (the speed does not
depend on them). Reports per variant, shape and batch:
median ms per step over --iters calls after warm-up (CUDA events), the ratio to ComfyUI BF16 eager,
peak GPU memory (allocated, and reserved: a CUDA graph's pool is reserved, not allocated), the output's
cosine to ComfyUI BF16 eager, and the time to the first step (the first call, including compilation, the
attention kernel's autotuning and a CUDA graph's capture, with Inductor's graph cache off and an empty
Triton cache unless --warm-caches). Each shape gets its own static graph unless --dynamo-defaults, which
leaves Dynamo as the loader does (a dynamic-shape graph from the second shape on). No test asserts any of
this; docs/speed.md quotes the JSON.

Variants:
  comfy_bf16            ComfyUI's Flux (comfy.ldm.flux.model.Flux), BF16, eager: what KSampler runs
  comfy_bf16_compile    the same under torch.compile (per block)
  comfy_fp8_fast        ComfyUI's weight_dtype fp8_e4m3fn_fast: FP8 weights, unscaled FP8 GEMMs, eager
  comfy_fp8_scaled      the same weights in Comfy-Org's fp8_scaled layout through ComfyUI's own loader (0.8:
                        comfy-kitchen's mixed-precision FP8 ops), eager; _compile: blocks under torch.compile
  comfy_native_export   the pack's exported calibrated checkpoint (comfy_quant FP8 with static input scales)
                        through ComfyUI's own loader, eager; _compile: blocks under torch.compile
  pack_bf16             this pack's transformer, BF16, eager
  pack_fp8              the PyTorch backend: FP8 GEMMs (torch._scaled_mm, static calibrated scales),
                        16-bit attention (cuDNN SDPA), eager
  pack_fp8_compile      the same, blocks compiled (runtime_torch.compile_blocks)
  pack_fp8_attn         the backend as the loader builds it from an fp8 state calibrated with attention:
                        FP8 GEMMs + FP8 attention (the fused Triton kernel), eager
  pack_fp8_attn_compile the same, blocks compiled: the pack's fast path
  pack_fp8_attn_compile_unfused_inputs  the same with QK-norm, RoPE and the attention inputs' FP8
                        quantization left to Inductor, not the fused kernel (fp8_attention_inputs_triton.py)
  pack_fp8_attn_compile_inductor_gelu  the same with the MLPs' GELU + FP8 quantization left to Inductor, not
                        the fused kernel (gelu_fp8_triton.py)
  pack_fp8_attn_compile_default_reductions  the same with Inductor's default choice of reduction kernels
                        (the LayerNorms loop over their rows; engines/inductor_choices.py is not installed)
  pack_fp8_attn_compile_tuned  the same with Inductor's coordinate-descent tuning of its kernels
  pack_fp8_attn_cudagraphs  the same with mode="reduce-overhead": each block replayed as a CUDA graph
  pack_fp8_attn_compile_graphed  pack_fp8_attn_compile with the whole step replayed as one CUDA graph
                        (engines/cuda_graph_step.py, the loader's cuda_graph input)
Asked for by name only (they need a build, scripts/build_fa3_fp8.sh, and a Hopper GPU):
  pack_fp8_attn_fa3_compile  pack_fp8_attn_compile with FlashAttention-3's FP8 kernel (the pack's patch)
                        attending in place of the Triton one (engines/fp8_attention_fa3.py)
  pack_fp8_attn_fa3_compile_graphed  the same, the step replayed as one CUDA graph
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

from engines import INPUT_NAMES, KONTEXT_DEV, random_state_dict, transformer_from_state_dict  # noqa: E402
from engines.kernel_ops import autotuned_choices  # noqa: E402
from engines.quantize import output_error, use_eager_fp8_fake_quant  # noqa: E402
from engines.tokens import edit_ids  # noqa: E402

GIB = 2**30
VARIANTS = ("comfy_bf16", "comfy_bf16_compile", "comfy_fp8_fast", "comfy_fp8_scaled", "comfy_fp8_scaled_compile",
            "comfy_native_export", "comfy_native_export_compile", "pack_bf16", "pack_fp8", "pack_fp8_compile",
            "pack_fp8_attn", "pack_fp8_attn_compile", "pack_fp8_attn_compile_unfused_inputs", "pack_fp8_attn_compile_default_reductions",
            "pack_fp8_attn_compile_inductor_gelu",
            "pack_fp8_attn_compile_tuned", "pack_fp8_attn_cudagraphs",
            "pack_fp8_attn_compile_graphed")
FA3_VARIANTS = ("pack_fp8_attn_fa3_compile", "pack_fp8_attn_fa3_compile_graphed")


def parse_shape(shape: str) -> tuple[int, bool]:
    """'1024r' -> (1024, True): side in pixels, with one same-size reference."""
    try:
        return int(shape.rstrip("r")), shape.endswith("r")
    except ValueError:
        raise SystemExit(f"--shapes: {shape!r} is not a side in pixels with an optional 'r' (e.g. 1024r)") from None


def step_inputs(cfg, size: int, reference: bool, batch: int, device, text_tokens: int = 512):
    """One sampling step's inputs at sigma 0.7 for a held-out pair of the default calibration set (encoded by
    StandInEncoder; calibration uses the first pair), so the cosine column measures what calibration covers."""
    from engines.accuracy import edit_step_inputs
    from engines.calibration import default_encoded_pairs

    pair = default_encoded_pairs(cfg, size, n_txt=text_tokens)[-1]
    x = edit_step_inputs(pair, sigma=0.7, seed=0, device=device, dtype=torch.bfloat16)
    if not reference:
        x["img"] = x["img"][:, :pair.reference.shape[1]]
        x["img_ids"] = edit_ids(pair.reference_grid, [])[None].to(device)
    return {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in x.items()}


def comfy_flux(sd, cfg, device, fp8_fast: bool = False):
    """ComfyUI's own Flux module (what its KSampler runs) on the GPU: BF16, or as its UNETLoader's
    weight_dtype fp8_e4m3fn_fast makes it (FP8 weights, fp8 optimizations on, BF16 compute)."""
    from comfyui_pack import comfy_flux_model

    gpu_sd = {k: v.to(device) for k, v in sd.items()}
    patcher = comfy_flux_model(cfg, gpu_sd, torch.bfloat16, weight_dtype=torch.float8_e4m3fn if fp8_fast else None,
                               fp8_optimizations=fp8_fast)
    return patcher.model.diffusion_model.eval()


_calibrated_state = {}


def fp8_model(sd, device, attention: bool, attention_kernel: str = "triton"):
    """The PyTorch backend exactly as the loader builds it, from an fp8 state calibrated (once per run,
    with attention quantization, on one default pair) with max calibration; attention=False runs that
    state with 16-bit attention. attention_kernel is named, not "auto" (the loader's default), so a variant
    runs the same kernel wherever FlashAttention-3 is built. Calibration quality does not change the speed."""
    import tempfile

    from engines.calibrated_state import save_calibrated_state
    from engines.calibration import calibration_forward_loop, default_encoded_pairs
    from engines.quantize import quantize_transformer
    from engines.recipes import load_recipe
    from engines.runtime_torch import load_fp8_transformer

    return load_fp8_transformer(lambda k: sd[k], calibrated_state_path(sd), device=device, dtype=torch.bfloat16,
                                fp8_attention=attention, attention_kernel=attention_kernel)


def calibrated_state_path(sd):
    """The fp8 state (attention included) calibrated once per run on one default pair, max calibration."""
    import tempfile

    from engines.calibrated_state import save_calibrated_state
    from engines.calibration import calibration_forward_loop, default_encoded_pairs
    from engines.quantize import quantize_transformer
    from engines.recipes import load_recipe

    if "path" not in _calibrated_state:
        recipe = load_recipe("fp8", attention=True)
        model = transformer_from_state_dict(sd)
        pairs = default_encoded_pairs(model.config)[:1]
        quantize_transformer(model, recipe, calibration_forward_loop(pairs, steps=2))
        _calibrated_state["path"] = save_calibrated_state(model, recipe,
                                                          Path(tempfile.mkdtemp()) / "s.calibration.safetensors")
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return _calibrated_state["path"]


def comfy_file(name: str, sd: dict) -> Path:
    """The same weights as a file in the layout a ComfyUI user would load (written once per run, on the CPU):
    fp8_scaled (Comfy-Org's layout: per-tensor FP8 weights and scales, no calibrated input scales) or
    native_export (the pack's calibrated checkpoint, engines/comfy_export.py)."""
    import tempfile

    if name not in _files:
        path = Path(tempfile.mkdtemp(prefix="kontext_files_")) / f"{name}.safetensors"
        cpu = {k: v.cpu() for k, v in sd.items()}
        if name == "fp8_scaled":
            sys.path.insert(0, str(ROOT / "tests"))
            from checkpoint_files import fp8_scaled_state_dict, save

            save(fp8_scaled_state_dict(cpu, input_scale=1.0), path)  # the scale ComfyUI's own files carry
        else:
            from engines.comfy_export import export_comfy_checkpoint
            from engines.source_weights import from_state_dict

            export_comfy_checkpoint(from_state_dict(cpu), calibrated_state_path(sd), path)
        _files[name] = path
    return _files[name]


_files = {}


def comfy_loaded(path: Path, device):
    """A file through ComfyUI's own diffusion-model loader (what Load Diffusion Model does) and on the GPU: its
    ops decide how each layer runs (0.8: comfy-kitchen mixed precision for comfy_quant / fp8_scaled files)."""
    import comfy.model_management
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(path))
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher.model.diffusion_model.eval()


def make_variant(name: str, sd: dict, cfg, device):
    """A callable taking step_inputs(...) -> output tokens."""
    from engines.runtime_torch import compile_blocks

    if name not in VARIANTS + FA3_VARIANTS:
        raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS + FA3_VARIANTS)}")
    if name.startswith(("comfy_fp8_scaled", "comfy_native_export")):
        module = comfy_loaded(comfy_file("fp8_scaled" if "fp8_scaled" in name else "native_export", sd), device)
        if name.endswith("_compile"):
            compile_blocks(module, pick_reductions=False)
        return lambda x: module.forward_orig(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                             x["guidance"])
    if name.startswith("comfy_"):
        module = comfy_flux(sd, cfg, device, fp8_fast=name == "comfy_fp8_fast")
        if name.endswith("_compile"):
            compile_blocks(module, pick_reductions=False)  # a plain torch.compile, as ComfyUI's own node does
        return lambda x: module.forward_orig(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                             x["guidance"])
    gpu_sd = {k: v.to(device) for k, v in sd.items()}
    if name == "pack_bf16":
        model = transformer_from_state_dict(gpu_sd)
    else:
        # an error saying why where FlashAttention-3 cannot run
        model = fp8_model(gpu_sd, device, attention=name.startswith("pack_fp8_attn"),
                          attention_kernel="flashattention3" if "_fa3_" in name else "triton")
        del gpu_sd
        if name.endswith("_unfused_inputs"):
            from engines.fp8_attention import FP8Attention

            for module in model.modules():
                if isinstance(module, FP8Attention):
                    module.fused_inputs = False
        if name.endswith("_inductor_gelu"):
            from engines.runtime_torch import FP8GELUMLP, FP8SingleStreamBlock

            for module in model.modules():
                if isinstance(module, (FP8GELUMLP, FP8SingleStreamBlock)):
                    module.fused_gelu = False
        if name.endswith(("_compile", "_compile_graphed", "_compile_unfused_inputs", "_compile_inductor_gelu")):
            compile_blocks(model)
        elif name.endswith("_compile_default_reductions"):
            compile_blocks(model, pick_reductions=False)
        elif name.endswith("_compile_tuned"):
            compile_blocks(model, tune=True)
        elif name.endswith("_cudagraphs"):
            compile_blocks(model, mode="reduce-overhead")
    if name.endswith("_graphed"):
        from engines.cuda_graph_step import CUDAGraphedTransformer

        graphed = CUDAGraphedTransformer(model)

        def step(x):
            return graphed(*(x[k] for k in INPUT_NAMES))
        step.release = graphed.release  # each shape's memory measured without the last shape's graph
        return step
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


def load_weights(args, device):
    """(state dict on the CPU, config): the checkpoint's, or random full-size Kontext weights."""
    if not args.checkpoint:
        sd = random_state_dict(KONTEXT_DEV, seed=0, dtype=torch.bfloat16, device=device)
        return {k: v.cpu() for k, v in sd.items()}, KONTEXT_DEV
    from engines import config_from_state_dict
    from engines.state_dict import read_checkpoint

    sd = read_checkpoint(args.checkpoint, torch.bfloat16)
    return sd, config_from_state_dict(sd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", default="1,2")
    p.add_argument("--shapes", default="1024r", help="comma-separated sides in pixels, 'r' = with one reference")
    p.add_argument("--checkpoint", help="a FLUX.1 Kontext [dev] safetensors (BFL or ComfyUI keys); default: random")
    p.add_argument("--text-tokens", type=int, default=512,
                   help="T5 tokens a step attends over: 512 as BFL's reference pads them (issue 7's shape); ComfyUI "
                        "pads a prompt to 256 and sends more only for a longer one")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step of each variant (first shape and batch): 25 costliest kernels")
    p.add_argument("--warm-caches", action="store_true",
                   help="keep Triton's kernel cache from earlier runs (first step then excludes kernel compilation)")
    p.add_argument("--dynamo-defaults", action="store_true",
                   help="leave Dynamo's automatic dynamic shapes and recompile limit at their defaults, as the "
                        "loader's compile_blocks does: from the second shape on, blocks run dynamic-shape graphs")
    p.add_argument("--out", default="output/step_speed.json")
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("--comfyui or COMFYUI_PATH: a ComfyUI checkout (its Flux is the baseline)")
    sys.path.insert(0, args.comfyui)
    use_eager_fp8_fake_quant()  # the calibration pass only sets scales; no ~1 min extension build
    if not args.dynamo_defaults:
        # One static graph per shape (what a user at one resolution gets), not a dynamic-shape graph from the
        # second shape on; enough recompiles for every shape of the sweep.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    # The first step as a user's first run sees it: no compiled graphs or autotuning from earlier runs (kernels
    # compiled by an earlier variant of this run are still reused).
    torch._inductor.config.fx_graph_cache = False
    if not args.warm_caches:
        import tempfile

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")

    device = torch.device("cuda")
    sd, cfg = load_weights(args, device)
    torch.cuda.empty_cache()
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    # Drawn and encoded once, used by every variant (all shapes stay on the GPU: tens of MB in the peak column).
    inputs = {(size, with_ref, batch): step_inputs(cfg, size, with_ref, batch, device, args.text_tokens)
              for size, with_ref in shapes for batch in batches}
    import triton

    env = dict(gpu=torch.cuda.get_device_name(), driver=_driver_version(), torch=torch.__version__,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), triton=triton.__version__,
               weights=args.checkpoint or "random", dynamo_defaults=args.dynamo_defaults, text_tokens=args.text_tokens)
    rows, reference = [], {}
    for name in args.variants.split(","):
        # Dynamo keeps compiled graphs per function, not per model: without this a variant whose blocks compile
        # with the same torch.compile options as an earlier one's would run that variant's graphs (so its
        # Inductor choices too) and skip its own compilation.
        torch._dynamo.reset()
        t0 = time.perf_counter()
        fn = make_variant(name, sd, cfg, device)
        setup_s = time.perf_counter() - t0
        gc.collect()
        torch.cuda.empty_cache()
        for key, x in inputs.items():
            size, with_ref, batch = key
            getattr(fn, "release", lambda: None)()
            torch.cuda.empty_cache()  # so the reserved peak is this shape's, not blocks cached before
            torch.cuda.reset_peak_memory_stats()  # the step's peak: weights + activations, not the set-up
            ms, first_s, out = time_steps(fn, x, args.warmup, args.iters)
            out = out.float().cpu()
            if name == "comfy_bf16":
                reference[key] = out
            cos = output_error(reference[key], out)[0] if key in reference else None
            base = next((r["ms_per_step"] for r in rows if r["variant"] == "comfy_bf16"
                         and (r["size"], r["reference"], r["batch"]) == key), None)
            row = dict(variant=name, size=size, reference=with_ref, tokens=x["img"].shape[1] + x["txt"].shape[1],
                       batch=batch, ms_per_step=round(ms, 1), speedup_vs_comfy_bf16=round(base / ms, 2) if base else None,
                       peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                       # what the process holds: a CUDA graph's private pool counts here, not above
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                       cosine_to_comfy_bf16=None if cos is None else round(cos, 5),
                       setup_s=round(setup_s, 1), first_step_s=round(first_s, 2))
            if name.startswith("pack_"):
                # the tile configs the pack's autotuners kept so far in this process (run to run they can differ)
                row["autotuned"] = autotuned_choices()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile and key == (*shapes[0], batches[0]):
                from torch.profiler import ProfilerActivity, profile

                with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(x)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90),
                      flush=True)
        fn = None
        if name.startswith(("comfy_fp8_scaled", "comfy_native_export")):
            import comfy.model_management

            comfy.model_management.unload_all_models()  # its loader keeps the model loaded otherwise
        gc.collect()
        torch.cuda.empty_cache()
    env["comfy_kitchen"] = _comfy_kitchen()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    print(json.dumps(env))
    print("| variant | shape | tokens | batch | ms/step | vs ComfyUI BF16 | peak GiB (reserved) | cosine | first step s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['speedup_vs_comfy_bf16']}x" if r["speedup_vs_comfy_bf16"] else "-"
        print(f"| {r['variant']} | {r['size']}{'+ref' if r['reference'] else ''} | {r['tokens']} | {r['batch']} | "
              f"{r['ms_per_step']} | {speedup} | {r['peak_gib']} ({r['peak_reserved_gib']}) | "
              f"{r['cosine_to_comfy_bf16']} | {r['first_step_s']} |")
    return 0


def _comfy_kitchen() -> dict | None:
    """comfy-kitchen's version and the backends ComfyUI left enabled (it disables CUDA below a cu130 torch)."""
    try:
        import importlib.metadata

        import comfy_kitchen
    except ImportError:
        return None
    backends = {k: {f: v.get(f) for f in ("available", "disabled", "unavailable_reason")} if isinstance(v, dict) else str(v)
                for k, v in comfy_kitchen.list_backends().items()}
    return {"version": importlib.metadata.version("comfy-kitchen"), "backends": backends}


def _driver_version() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
