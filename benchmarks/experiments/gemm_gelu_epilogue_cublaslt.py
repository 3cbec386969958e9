"""cuBLASLt FP8 GEMM with the GELU epilogue writing FP8 (through nvmath-python) vs the pack's
_scaled_mm (BF16 out) + fused GELU/FP8 kernel, on the MLP up-projection shapes of a Kontext step.

Needs nvmath-python 1.0 (with cuda-core, cuda-bindings, cuda-pathfinder). Run from the repository root on a GPU:
OUT=dir python benchmarks/experiments/gemm_gelu_epilogue_cublaslt.py
"""
import json, os, sys, functools
sys.path.insert(0, ".")
import torch
from triton.testing import do_bench
import nvmath
from nvmath.linalg.advanced import Matmul, MatmulEpilog
from engines.gelu_fp8_triton import gelu_fp8
rows = []
for M, N, K in ((8192, 12288, 3072), (8704, 12288, 3072), (8704, 21504, 3072)):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(M, K, device="cuda", generator=g)).to(torch.float8_e4m3fn)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
    sa = torch.tensor([0.02], device="cuda"); sw = torch.tensor([0.002], device="cuda")
    h = torch._scaled_mm(a, w.t(), sa[0], sw[0], out_dtype=torch.bfloat16)
    out_scale = (torch.nn.functional.gelu(h.float(), approximate="tanh").abs().amax() / 448 * 0.7).reshape(1)  # ~some saturation
    def base():
        h = torch._scaled_mm(a, w.t(), sa[0], sw[0], out_dtype=torch.bfloat16)
        return gelu_fp8(h, out_scale)
    ref = base()
    r = dict(M=M, N=N, K=K)
    r["gemm_bf16_us"] = round(1000 * do_bench(lambda: torch._scaled_mm(a, w.t(), sa[0], sw[0], out_dtype=torch.bfloat16), warmup=25, rep=200, return_mode="median"), 1)
    r["gemm_plus_gelu_fp8_kernel_us"] = round(1000 * do_bench(base, warmup=25, rep=200, return_mode="median"), 1)
    try:
        inv = (1.0 / out_scale).float()
        for epi, rtype, name in ((MatmulEpilog.GELU, nvmath.CudaDataType.CUDA_R_8F_E4M3, "nvmath_gelu_fp8"),
                                 (None, nvmath.CudaDataType.CUDA_R_16BF, "nvmath_bf16")):
            scales = {"a": sa, "b": sw} if rtype != nvmath.CudaDataType.CUDA_R_8F_E4M3 else {"a": sa, "b": sw, "d": inv}
            mm = Matmul(a, w.t(), quantization_scales=scales, options={"result_type": rtype})
            mm.plan(epilog=epi) if epi is not None else mm.plan()
            out = mm.execute()
            torch.cuda.synchronize()
            r[name + "_us"] = round(1000 * do_bench(lambda: mm.execute(), warmup=25, rep=200, return_mode="median"), 1)
            if name == "nvmath_gelu_fp8":
                o, rf = out.view(torch.float8_e4m3fn).float(), ref.float()
                r["fused_vs_pack_rel"] = round(((o - rf).norm() / rf.norm()).item(), 5)
                r["fused_bytes_differing"] = round((out.view(torch.uint8) != ref.view(torch.uint8)).float().mean().item(), 4)
                r["fused_nan"] = int(torch.isnan(o).sum()); r["fused_max"] = o.abs().max().item(); r["pack_max"] = rf.abs().max().item()
                exact = (torch.nn.functional.gelu(torch._scaled_mm(a, w.t(), sa[0], sw[0], out_dtype=torch.float32), approximate="tanh") / out_scale).clamp(-448, 448)
                r["fused_vs_fp32_rel"] = round(((o - exact).norm() / exact.norm()).item(), 5)
                r["pack_vs_fp32_rel"] = round(((rf - exact).norm() / exact.norm()).item(), 5)
                # Python cost of one execute (host side)
                import time; torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(50): mm.execute()
                r["execute_host_us"] = round((time.perf_counter() - t) / 50 * 1e6, 1); torch.cuda.synchronize()
    except Exception as e:
        import traceback; traceback.print_exc()
        r["nvmath_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(r), flush=True); rows.append(r)
json.dump(dict(gpu=torch.cuda.get_device_name(), nvmath=nvmath.__version__, rows=rows), open(os.environ.get("OUT", ".") + "/gemm_gelu_epilogue_cublaslt_experiment_h100.json", "w"), indent=1)
