"""Attention configs with a register cap so that 3 programs fit per SM (BLOCK_N=64): time and error at 3 sizes.

Run from the repository root on a GPU: OUT=dir python benchmarks/experiments/attention_three_programs_per_sm.py
"""
import sys, json, os, functools
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch
from triton.testing import do_bench
from attention_speed import attention_inputs, HEADS, HEAD_DIM
from engines.fp8 import FP8_MAX
from engines.fp8_attention_triton import fp8_attention
import torch.nn.functional as F
configs = [None,
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=168),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, maxnreg=168),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, maxnreg=168),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4, maxnreg=128),
]
rows = []
for L in (8704, 15650, 2560):
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (torch.randn(1, HEADS, L, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) * s for s in (2.0, 2.0, 1.0))
    scales = torch.stack([t.float().abs().max() / FP8_MAX for t in (q, k, v)])
    x = attention_inputs(q, k, v, scales, out_scale=None)
    exact = F.scaled_dot_product_attention(*x["dequantized"]).transpose(1, 2).float()
    for c in configs:
        try:
            f = functools.partial(fp8_attention, x["q8"], x["k8"], x["vt8"], x["scales"], torch.bfloat16, config=c)
            out = f().float()
            err = ((out - exact).norm() / exact.norm()).item()
            ms = do_bench(f, warmup=50, rep=300, return_mode="median")
            r = dict(tokens=L, config=c or "autotuned", ms=round(ms, 4), rel_err=round(err, 5))
        except Exception as e:
            r = dict(tokens=L, config=c, error=f"{type(e).__name__}: {str(e)[:200]}")
        print(json.dumps(r), flush=True); rows.append(r)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(os.environ.get("OUT", ".") + "/attention_speed_three_programs_bn64_experiment_h100.json", "w"), indent=1)
