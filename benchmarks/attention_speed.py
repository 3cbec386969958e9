"""One attention call at Kontext's sizes on one GPU: the pack's Triton FP8 kernel (each tile config, and
autotuned) against PyTorch's BF16 SDPA backends and cuDNN's FP8 attention, in one run.

    python benchmarks/attention_speed.py [--tokens 2560,8704,15650] [--more-configs] [--no-sdpa]
                                         [--qk-std 2.0] [--fa3 NAME=LIBRARY ...] [--out output/attention_speed.json]

24 heads of 128, batch 1; tokens = 512 text + edit (+ reference) image tokens (8704: 1024^2 with a
1024^2 reference). --more-configs adds tile shapes the autotuner does not try. Reports the median
ms per call (triton.testing.do_bench), TFLOP/s (4 * L^2 * D * H multiply-adds counted as 2 FLOP each),
the error against float32 attention of the same FP8 inputs, and `flat`: the output's mean over its true
mean when every key scores the same (Q = 0, V in [0.5, 1]): 1.0 is right, below it a kernel loses sums
of many similar terms. cuDNN's row (where nvidia-cudnn-frontend is installed) writes FP8, quantized with
the output's amax as the projection's input scale would be, so its error includes that rounding; the
row "fp8_triton_output_quantized_to_fp8" is the Triton kernel's output rounded the same way. --fa3 adds a
row "fp8_fa3_NAME" for a build of FlashAttention-3's FP8 forward (scripts/build_fa3_fp8.sh).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import FP8_MAX, quantize_fp8  # noqa: E402
from engines.fp8_attention import fp8_attention_reference, quantize_transposed_for_kernel  # noqa: E402
from engines.fp8_attention_fa3 import FA3FP8Attention  # noqa: E402
from engines.fp8_attention_triton import CONFIGS, fp8_attention  # noqa: E402

from cudnn_fp8_attention import cudnn_fp8_attention, frontend_version, unavailable_reason  # noqa: E402
from results_table import write_results  # noqa: E402

HEADS, HEAD_DIM = 24, 128
MORE_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
                dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3)]


def attention_inputs(q, k, v, scales, out_scale) -> dict:
    """Everything any kernel here takes, from 16-bit q, k, v [B, H, L, D] and their FP8 scales."""
    q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), scales))
    dequantized = [t.float() * s for t, s in zip((q8, k8, v8), scales)]
    return dict(q8=q8, k8=k8, v8=v8, vt8=quantize_transposed_for_kernel(v, scales[2]), scales=scales,
                out_scale=out_scale, dequantized=dequantized, bf16=[t.to(torch.bfloat16) for t in dequantized])


def flat_inputs(seq_len: int) -> dict:
    """Q = 0: every key scores the same, so each output is the mean of V's column (V in [0.5, 1])."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.zeros(1, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.rand(1, HEADS, seq_len, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) * 0.5 + 0.5
    scales = torch.tensor([1.0, k.float().abs().max() / FP8_MAX, 1.0 / FP8_MAX], device="cuda")
    # FP8 outputs at scale 1/512: the mean, 0.75, is 384 on the FP8 grid (at 1/448 it would fall on a rounding
    # tie and every FP8 output would read low).
    return attention_inputs(q, k, v, scales, torch.tensor([1.0 / 512], device="cuda"))


UNTIMED = "untimed"


def kernels(more_configs: bool, sdpa: bool, fa3: dict[str, str]) -> dict:
    """name -> fn(inputs) -> [B, L, H, D] (FP8 outputs at inputs["out_scale"]), an Exception saying why the
    kernel cannot run here, or (UNTIMED, fn) for a row measured for accuracy only."""
    found = {}
    if sdpa:
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def run(x, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(*x["bf16"]).transpose(1, 2)
            found[f"sdpa_bf16_{backend.name.lower()}"] = run
    why_not_cudnn = unavailable_reason(torch.device("cuda", torch.cuda.current_device()))
    found["fp8_cudnn_fp8_out"] = RuntimeError(why_not_cudnn) if why_not_cudnn else (
        lambda x: cudnn_fp8_attention(x["q8"], x["k8"], x["v8"], x["scales"], x["out_scale"]))
    # Accuracy only (not timed: the eager quantization after it is not what a compiled step runs).
    found["fp8_triton_output_quantized_to_fp8"] = UNTIMED, lambda x: quantize_fp8(
        fp8_attention(x["q8"], x["k8"], x["vt8"], x["scales"], torch.bfloat16), x["out_scale"])
    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]
    for config in configs + (MORE_CONFIGS if more_configs else []):
        name = "fp8_triton_" + "_".join(f"{k}{v}" for k, v in config.items())
        found[name] = functools.partial(_triton, config=config)
    found["fp8_triton_autotuned"] = _triton
    found["fp8_triton_autotuned_unpromoted_pv"] = functools.partial(_triton, promote_pv=False)
    for name, library in fa3.items():
        try:
            attention = FA3FP8Attention(library)
        except (OSError, ValueError) as e:
            found[f"fp8_fa3_{name}"] = e
        else:
            found[f"fp8_fa3_{name}"] = lambda x, attention=attention: attention(x["q8"], x["k8"], x["v8"], x["scales"])
    # The recipe as ModelOpt's fake-quant computes it (FP32 matmuls, normalized P on the FP8 grid).
    found["fp8_recipe_pytorch_fp32"] = lambda x: fp8_attention_reference(x["q8"], x["k8"], x["v8"], x["scales"],
                                                                          torch.float32)
    return found


def _triton(x, **options):
    return fp8_attention(x["q8"], x["k8"], x["vt8"], x["scales"], torch.bfloat16, **options)


def as_float(out, x):
    return out.float() * x["out_scale"] if out.dtype == torch.float8_e4m3fn else out.float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2560,8704,15650")
    p.add_argument("--more-configs", action="store_true")
    p.add_argument("--no-sdpa", action="store_true", help="skip the BF16 SDPA rows")
    p.add_argument("--qk-std", type=float, default=2.0,
                   help="standard deviation of Q and K entries: 2 gives peaked attention rows, 0.3 diffuse ones")
    p.add_argument("--fa3", action="append", default=[], metavar="NAME=LIBRARY",
                   help="a build of FlashAttention-3's FP8 forward to time (scripts/build_fa3_fp8.sh); repeatable")
    p.add_argument("--out", default="output/attention_speed.json")
    args = p.parse_args(argv)
    fa3 = {}
    for item in args.fa3:
        name, sep, library = item.partition("=")
        if not sep or not name or not library:
            p.error(f"--fa3 takes NAME=LIBRARY, got {item!r}")
        fa3[name] = library
    from triton.testing import do_bench

    rows = []
    for seq_len in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(seq_len)
        # QK-normed queries and keys have a spread of scores, as in the model (--qk-std sets how much).
        q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) * s
                   for s in (args.qk_std, args.qk_std, 1.0))
        scales = torch.stack([t.float().abs().max() / FP8_MAX for t in (q, k, v)])
        x = attention_inputs(q, k, v, scales, out_scale=None)
        exact = F.scaled_dot_product_attention(*x["dequantized"]).transpose(1, 2)
        x["out_scale"] = (exact.abs().max() / FP8_MAX).reshape(1)  # as a calibrated projection input scale
        flat = flat_inputs(seq_len)
        flat_mean = flat["dequantized"][2].mean().item()
        flop = 4 * seq_len * seq_len * HEAD_DIM * HEADS
        for name, kernel in kernels(args.more_configs, not args.no_sdpa, fa3).items():
            try:
                if isinstance(kernel, Exception):
                    raise kernel
                timed = not (isinstance(kernel, tuple) and kernel[0] == UNTIMED)
                kernel = kernel if timed else kernel[1]
                out = as_float(kernel(x), x)
                ms = do_bench(functools.partial(kernel, x), warmup=50, rep=300, return_mode="median") if timed else None
                flat_ratio = as_float(kernel(flat), flat).mean().item() / flat_mean
            except Exception as e:  # a config that does not fit or compile on this GPU: say so, keep going
                print(json.dumps(dict(tokens=seq_len, kernel=name, error=f"{type(e).__name__}: {str(e)[:300]}")),
                      flush=True)
                continue
            err = ((out - exact).norm() / exact.norm()).item()
            row = dict(tokens=seq_len, qk_std=args.qk_std, kernel=name, ms=ms and round(ms, 3),
                       tflops=ms and round(flop / ms / 1e9, 1), rel_err_vs_fp32=round(err, 5),
                       flat=round(flat_ratio, 4))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 cudnn=torch.backends.cudnn.version(), cudnn_frontend=frontend_version(),
                                 triton=__import__("triton").__version__), rows,
                  [("tokens", "tokens"), ("kernel", "kernel"), ("ms", "ms"), ("TFLOP/s", "tflops"),
                   ("rel. error vs FP32", "rel_err_vs_fp32"), ("flat", "flat")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
