"""The FP8 attention kernel with its 16-bit output against its FP8 output (FP8Attention.output_fp8) on one GPU,
per tile config, in turns, at Kontext's sizes: what the scaled epilogue costs the kernel itself.

    python benchmarks/attention_output_speed.py [--tokens 8704] [--rounds 5] [--out output/attention_output_speed.json]

24 heads of 128, batch 1. Forms: "bf16" (fp8_attention, the default), "fp8_two_outputs" (a double block's
512 text rows and the rest at two scales), "fp8_linear2_columns" (a single block's: into the first 3072 columns
of a [tokens, 15360] FP8 buffer). Median ms per call (triton.testing.do_bench), the forms taking turns for
--rounds rounds so clock drift hits all alike; the median of the rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import FP8, FP8_MAX, quantize_fp8  # noqa: E402
from engines.fp8_attention import quantize_transposed_for_kernel  # noqa: E402
from engines.fp8_attention_triton import CONFIGS, fp8_attention, fp8_attention_scaled_out  # noqa: E402

HEADS, HEAD_DIM, TEXT_TOKENS, MLP_HIDDEN = 24, 128, 512, 12288


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8704")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="output/attention_output_speed.json")
    args = p.parse_args(argv)
    import triton.testing

    rows = []
    for seq_len in map(int, args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", generator=g) * s for s in (2.0, 2.0, 1.0))
        scales = torch.stack([t.abs().max() / FP8_MAX for t in (q, k, v)]).float()
        q8, k8 = quantize_fp8(q, scales[0]), quantize_fp8(k, scales[1])
        vt8 = quantize_transposed_for_kernel(v, scales[2])
        s_txt, s_img = torch.tensor([0.004], device="cuda"), torch.tensor([0.003], device="cuda")
        txt = torch.empty(1, TEXT_TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=FP8)
        img = torch.empty(1, seq_len - TEXT_TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=FP8)
        linear2_input = torch.empty(seq_len, HEADS * HEAD_DIM + MLP_HIDDEN, device="cuda", dtype=FP8)
        columns = linear2_input[:, :HEADS * HEAD_DIM].view(1, seq_len, HEADS, HEAD_DIM)
        for c in CONFIGS:
            config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            forms = {
                "bf16": lambda: fp8_attention(q8, k8, vt8, scales, torch.bfloat16, config=config),
                "fp8_two_outputs": lambda: fp8_attention_scaled_out(q8, k8, vt8, scales, [txt, img], [s_txt, s_img],
                                                                    config=config),
                "fp8_linear2_columns": lambda: fp8_attention_scaled_out(q8, k8, vt8, scales, [columns], [s_txt],
                                                                        config=config),
            }
            times = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, fn in forms.items():
                    times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200))
            row = dict(tokens=seq_len, config=config, **{f"{n}_ms": round(statistics.median(t), 4)
                                                          for n, t in times.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
