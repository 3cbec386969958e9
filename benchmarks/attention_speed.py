"""One attention call at Kontext's sizes on one GPU: the fused FP8 kernel (each tile config, and autotuned)
against PyTorch's BF16 SDPA backends, in one run.

    python benchmarks/attention_speed.py [--tokens 2560,8704,15650] [--more-configs]
                                         [--no-sdpa] [--out output/attention_speed.json]

24 heads of 128, batch 1; tokens = 512 text + edit (+ reference) image tokens (8704: 1024^2 with a
1024^2 reference). --more-configs adds tile shapes the autotuner does not try. Reports the median
ms per call (triton.testing.do_bench), TFLOP/s (4 * L^2 * D * H multiply-adds counted as 2 FLOP each),
and the error against float32 attention of the same FP8 inputs.
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
from engines.fp8_attention_triton import CONFIGS, fp8_attention  # noqa: E402

HEADS, HEAD_DIM = 24, 128
MORE_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
                dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2560,8704,15650")
    p.add_argument("--more-configs", action="store_true")
    p.add_argument("--no-sdpa", action="store_true", help="skip the BF16 SDPA rows")
    p.add_argument("--out", default="output/attention_speed.json")
    args = p.parse_args(argv)
    from triton.testing import do_bench

    rows = []
    for seq_len in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(seq_len)
        # QK-normed queries and keys have a spread of scores, as in the model.
        q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) * s
                   for s in (2.0, 2.0, 1.0))
        scales = torch.stack([t.float().abs().max() / FP8_MAX for t in (q, k, v)])
        q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), scales))
        vt8 = quantize_transposed_for_kernel(v, scales[2])
        qd, kd, vd = (t.float() * s for t, s in zip((q8, k8, v8), scales))
        exact = F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2)
        flop = 4 * seq_len * seq_len * HEAD_DIM * HEADS

        def record(name, fn):
            try:
                out = fn()
                ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            except Exception as e:  # a config that does not fit or compile on this GPU: say so, keep going
                print(json.dumps(dict(tokens=seq_len, kernel=name, error=f"{type(e).__name__}: {str(e)[:300]}")),
                      flush=True)
                return
            err = ((out.float() - exact).norm() / exact.norm()).item()
            row = dict(tokens=seq_len, kernel=name, ms=round(ms, 3), tflops=round(flop / ms / 1e9, 1),
                       rel_err_vs_fp32=round(err, 5))
            rows.append(row)
            print(json.dumps(row), flush=True)

        qb, kb, vb = (t.to(torch.bfloat16) for t in (qd, kd, vd))
        for backend in () if args.no_sdpa else (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            with sdpa_kernel([backend]):
                record(f"sdpa_bf16_{backend.name.lower()}",
                       lambda: F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2))
        configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]
        for config in configs + (MORE_CONFIGS if args.more_configs else []):
            name = "fp8_triton_" + "_".join(f"{k}{v}" for k, v in config.items())
            record(name, functools.partial(fp8_attention, q8, k8, vt8, scales, torch.bfloat16, config=config))
        run = functools.partial(fp8_attention, q8, k8, vt8, scales, torch.bfloat16)
        record("fp8_triton_autotuned", run)
        record("fp8_triton_autotuned_unpromoted_pv", functools.partial(run, promote_pv=False))
        # The recipe as ModelOpt's fake-quant computes it (FP32 matmuls, normalized P on the FP8 grid).
        record("fp8_recipe_pytorch_fp32", lambda: fp8_attention_reference(q8, k8, v8, scales, torch.float32))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                              triton=__import__("triton").__version__, rows=rows), indent=2))
    print("| tokens | kernel | ms | TFLOP/s | rel. error vs FP32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['kernel']} | {r['ms']} | {r['tflops']} | {r['rel_err_vs_fp32']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
