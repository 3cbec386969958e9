"""Experiment: CUTLASS FP8 GEMMs with the step's elementwise work in their epilogues, against cuBLAS + the pack's kernels.

    python benchmarks/gemm_epilogue_cutlass_experiment.py --lib NAME=LIBRARY [--lib ...] [--out FILE]

LIBRARY: a build of gemm_epilogue_cutlass_experiment.cu (beside this script; its header has the nvcc line), one tile
config each, exporting kontext_fp8_gemm_bias, kontext_fp8_gemm_gelu_fp8 and kontext_fp8_gemm_residual. For each
image-stream GEMM shape of a 1024^2 + reference step (batch 1) and the work after it, reports the median ms
(triton.testing.do_bench) of
  - cuBLAS alone (torch._scaled_mm with the bias, BF16 out), and cuBLAS + that work as the pack runs it
    (gelu: the pack's GELU + FP8 Triton kernel; residual: residual + gate * out, one kernel),
  - each CUTLASS build, the work fused into its epilogue,
the CUTLASS output's error against the cuBLAS path's (FP8 outputs compared dequantized), and the sums a step runs.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import FP8, FP8_MAX, quantize_fp8  # noqa: E402
from engines.gelu_fp8_triton import gelu_fp8  # noqa: E402

# (name, rows, in, out, epilogue): the image-stream GEMMs of a double block (8192 rows) and a single block (8704).
SHAPES = [("double_qkv", 8192, 3072, 9216, "bias"), ("double_proj", 8192, 3072, 3072, "residual"),
          ("double_mlp_up", 8192, 3072, 12288, "gelu"), ("double_mlp_down", 8192, 12288, 3072, "residual"),
          ("single_linear1", 8704, 3072, 21504, "bias"), ("single_linear1_qkv", 8704, 3072, 9216, "bias"),
          ("single_linear1_mlp", 8704, 3072, 12288, "gelu"), ("single_linear2", 8704, 15360, 3072, "residual")]
# How many of each a step runs (19 double blocks, 38 single blocks).
PER_STEP = {"double_qkv": 19, "double_proj": 19, "double_mlp_up": 19, "double_mlp_down": 19, "single_linear1": 38,
            "single_linear1_qkv": 38, "single_linear1_mlp": 38, "single_linear2": 38}

P = ctypes.c_void_p
I = ctypes.c_int
L = ctypes.c_long


def load(path: str):
    lib = ctypes.CDLL(path)
    lib.kontext_fp8_gemm_bias.argtypes = [I, I, I, P, L, P, L, P, P, P, P, L, P, ctypes.c_size_t, P]
    lib.kontext_fp8_gemm_gelu_fp8.argtypes = [I, I, I, P, L, P, L, P, P, P, P, P, L, P, ctypes.c_size_t, P]
    lib.kontext_fp8_gemm_residual.argtypes = [I, I, I, P, L, P, L, P, P, P, L, P, L, P, ctypes.c_size_t, P]
    return lib


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lib", action="append", required=True, metavar="NAME=LIBRARY")
    p.add_argument("--out", default="output/gemm_epilogue_cutlass_experiment.json")
    args = p.parse_args()
    libs = {spec.split("=", 1)[0]: load(spec.split("=", 1)[1]) for spec in args.lib}
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    rows_out = []
    for name, m, k, n, epilogue in SHAPES:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        s_a = (x.abs().amax().float() / FP8_MAX).reshape(())
        s_b = (w.abs().amax().float() / FP8_MAX).reshape(())
        a8, w8 = quantize_fp8(x, s_a), quantize_fp8(w, s_b)
        bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        stream = torch.cuda.current_stream().cuda_stream

        def cublas():
            return torch._scaled_mm(a8, w8.t(), scale_a=s_a, scale_b=s_b, bias=bias, out_dtype=torch.bfloat16)

        ref16 = cublas()
        if epilogue == "gelu":
            g = torch.nn.functional.gelu(ref16.float(), approximate="tanh")
            next_scale = (g.abs().amax() / FP8_MAX).reshape(())
            d_scale = (1.0 / next_scale).reshape(())

            def baseline():
                return gelu_fp8(cublas(), next_scale)
            ref = baseline().float() * next_scale
        elif epilogue == "residual":
            residual = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
            gate = torch.randn(n, device=dev, dtype=torch.bfloat16)

            def baseline():
                return torch.addcmul(residual, gate, cublas())
            ref = baseline()
            alpha = (gate.float() * s_a * s_b).contiguous()
            gbias = (gate.float() * bias.float()).contiguous()
        else:
            baseline = cublas
            ref = ref16
        row = {"shape": name, "m": m, "k": k, "n": n, "epilogue": epilogue, "per_step": PER_STEP[name],
               "cublas_ms": round(do_bench(cublas, warmup=25, rep=200, return_mode="median"), 4),
               "cublas_plus_epilogue_ms": round(do_bench(baseline, warmup=25, rep=200, return_mode="median"), 4)}
        for lib_name, lib in libs.items():
            if epilogue == "gelu":
                out = torch.empty(m, n, device=dev, dtype=FP8)

                def run(out=out, lib=lib):
                    rc = lib.kontext_fp8_gemm_gelu_fp8(m, n, k, a8.data_ptr(), k, w8.data_ptr(), k, bias.data_ptr(),
                                                       s_a.data_ptr(), s_b.data_ptr(), d_scale.data_ptr(),
                                                       out.data_ptr(), n, ws.data_ptr(), ws.numel(), stream)
                    assert rc == 0, rc
                    return out
            elif epilogue == "residual":
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)

                def run(out=out, lib=lib):
                    rc = lib.kontext_fp8_gemm_residual(m, n, k, a8.data_ptr(), k, w8.data_ptr(), k, alpha.data_ptr(),
                                                       gbias.data_ptr(), residual.data_ptr(), n, out.data_ptr(), n,
                                                       ws.data_ptr(), ws.numel(), stream)
                    assert rc == 0, rc
                    return out
            else:
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)

                def run(out=out, lib=lib):
                    rc = lib.kontext_fp8_gemm_bias(m, n, k, a8.data_ptr(), k, w8.data_ptr(), k, bias.data_ptr(),
                                                   s_a.data_ptr(), s_b.data_ptr(), out.data_ptr(), n, ws.data_ptr(),
                                                   ws.numel(), stream)
                    assert rc == 0, rc
                    return out
            try:
                got = run()
                torch.cuda.synchronize()
                got = got.float() * next_scale if epilogue == "gelu" else got
                row[f"{lib_name}_ms"] = round(do_bench(run, warmup=25, rep=200, return_mode="median"), 4)
                row[f"{lib_name}_rel_err"] = rel_err(got, ref)
            except Exception as e:  # a config that cannot run this shape: say so in its row
                row[f"{lib_name}_error"] = repr(e)[:200]
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    by_name = {row["shape"]: row for row in rows_out}
    # cuBLAS + the pack's kernels run a single block's linear1 as one GEMM, then the GELU kernel on its MLP half;
    # the CUTLASS path runs it as two GEMMs, the MLP half with the GELU fused.
    gelu_kernel_ms = by_name["single_linear1_mlp"]["cublas_plus_epilogue_ms"] - by_name["single_linear1_mlp"]["cublas_ms"]
    double = ["double_qkv", "double_proj", "double_mlp_up", "double_mlp_down"]
    totals = {"cublas_plus_epilogue": 19 * sum(by_name[s]["cublas_plus_epilogue_ms"] for s in double)
              + 38 * (by_name["single_linear1"]["cublas_ms"] + gelu_kernel_ms
                      + by_name["single_linear2"]["cublas_plus_epilogue_ms"])}
    for lib_name in libs:
        totals[lib_name] = (19 * sum(by_name[s].get(f"{lib_name}_ms", float("nan")) for s in double)
                            + 38 * sum(by_name[s].get(f"{lib_name}_ms", float("nan"))
                                       for s in ("single_linear1_qkv", "single_linear1_mlp", "single_linear2")))
    summary = {"ms_per_step_image_gemms": {k: round(v, 2) for k, v in totals.items()},
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(summary), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows_out, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
