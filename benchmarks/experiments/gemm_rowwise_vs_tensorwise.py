"""FP8 GEMMs of a Kontext step: cuBLAS tensorwise vs PyTorch's rowwise path (CUTLASS on sm90), per shape.

Run from the repository root on a GPU: OUT=dir python benchmarks/experiments/gemm_rowwise_vs_tensorwise.py
"""
import json, os, torch
from triton.testing import do_bench
shapes = [(8704, 21504, 3072, 38), (8704, 3072, 15360, 38), (8192, 9216, 3072, 19), (8192, 3072, 3072, 19),
          (8192, 12288, 3072, 19), (8192, 3072, 12288, 19), (512, 9216, 3072, 19), (512, 3072, 3072, 19),
          (512, 12288, 3072, 19), (512, 3072, 12288, 19)]
rows = []; tot = {}
for M, N, K, n in shapes:
    a = (torch.randn(M, K, device="cuda") / 4).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K, device="cuda") / 4).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device="cuda")
    ra, rb = torch.ones(M, 1, device="cuda"), torch.ones(1, N, device="cuda")
    r = dict(M=M, N=N, K=K, calls=n)
    for name, f in (("tensorwise", lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)),
                    ("tensorwise_fast_accum", lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)),
                    ("rowwise", lambda: torch._scaled_mm(a, b, ra, rb, out_dtype=torch.bfloat16)),
                    ("rowwise_fast_accum", lambda: torch._scaled_mm(a, b, ra, rb, out_dtype=torch.bfloat16, use_fast_accum=True))):
        try:
            ref = torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16).float()
            out = f().float(); same = ((out - ref).norm() / ref.norm()).item()
            ms = do_bench(f, warmup=25, rep=200, return_mode="median")
            r[name] = round(ms * 1000, 1); r[name + "_tflops"] = round(2 * M * N * K / ms / 1e9, 0); r[name + "_rel_diff"] = round(same, 6)
            tot[name] = tot.get(name, 0) + ms * n
        except Exception as e:
            r[name] = f"{type(e).__name__}: {str(e)[:150]}"
    print(json.dumps(r), flush=True); rows.append(r)
print("step total ms:", {k: round(v, 2) for k, v in tot.items()})
json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, step_total_ms=tot), open(os.environ.get("OUT", ".") + "/gemm_rowwise_vs_tensorwise_experiment_h100.json", "w"), indent=1)
