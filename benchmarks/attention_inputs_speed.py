"""The FP8 attention inputs (QK-norm + RoPE + FP8 quantization, V transposed) at Kontext's sizes on one GPU: the
fused kernel in each tile config against the same PyTorch under torch.compile, in one run.

    python benchmarks/attention_inputs_speed.py [--tokens 8704] [--more-configs] [--out output/attention_inputs_speed.json]

Per size: a single block's one stream of `tokens`, and a double block's two (512 text + the rest image).
The kernel runs as two launches (Q and K; V): with --more-configs rows qk_* vary the first's tile config,
v_* the second's.
24 heads of 128, batch 1, the inputs strided views of one QKV projection as in the model. Reports the
microseconds per block (see time_us) and the bandwidth that moving the bytes at least
once takes (16-bit Q, K, V read, FP8 written).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import quantize_fp8  # noqa: E402
from engines.fp8_attention import quantize_transposed_for_kernel  # noqa: E402
from engines.fp8_attention_inputs_triton import fp8_attention_inputs  # noqa: E402
from engines.transformer import Attention, EmbedND, QKNorm  # noqa: E402

from results_table import write_results  # noqa: E402

HEADS, HEAD_DIM, TEXT = 24, 128, 512
MORE_CONFIGS = [dict(BLOCK_L=block, HEADS_PER_PROGRAM=heads, num_warps=warps)
                for block in (16, 32, 64, 128) for heads in (1, 2, 4, 8, 24) for warps in (2, 4, 8)]


def time_us(fn) -> float:
    """Median GPU microseconds per call, replayed from a CUDA graph: the wrapper's Python and the launches
    (four for a double block) cost more CPU time than the kernels take, so timing calls back to back, or with
    triton.testing.do_bench, measured the CPU (medians 1.6x apart between two runs here)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def streams_for(lengths: list[int]):
    g = torch.Generator(device="cuda").manual_seed(0)
    streams = []
    for length in lengths:
        qkv = torch.randn(1, length, 3 * HEADS * HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = qkv.view(1, length, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        streams.append((q, k, v, QKNorm(HEAD_DIM, dtype=torch.bfloat16, device="cuda")))
    ids = torch.randint(0, 64, (1, sum(lengths), 3), device="cuda", generator=g).float()
    return streams, EmbedND(10_000, (16, 56, 56))(ids)


class Unfused(Attention):
    """Attention.attend's norm, concatenation and RoPE, then FP8Attention's quantization: what Inductor fuses."""

    def forward(self, q, k, v):
        return quantize_fp8(q, self.scales[0]), quantize_fp8(k, self.scales[1]), quantize_transposed_for_kernel(
            v, self.scales[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8704")
    p.add_argument("--more-configs", action="store_true", help="also the tile configs the autotuner does not try")
    p.add_argument("--out", default="output/attention_inputs_speed.json")
    args = p.parse_args(argv)
    scales = torch.tensor([0.02, 0.02, 0.01], device="cuda")
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for block, lengths in (("single", [tokens]), ("double", [TEXT, tokens - TEXT])):
            streams, pe = streams_for(lengths)
            inputs = ([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
                      [s[3].query_norm.scale for s in streams], [s[3].key_norm.scale for s in streams], pe, scales)
            moved = tokens * HEADS * HEAD_DIM * 3 * (2 + 1)
            unfused = Unfused()
            unfused.scales = scales
            compiled = torch.compile(unfused.attend)
            runs = {"pytorch_compiled": lambda: compiled(streams, pe)}
            runs["fused_default"] = lambda: fp8_attention_inputs(*inputs)
            # Each launch's configs with the other launch's default: the rows differ by the one launch.
            for config in MORE_CONFIGS if args.more_configs else []:
                name = "_".join(f"{k}{v}" for k, v in config.items())
                runs["qk_" + name] = lambda config=config: fp8_attention_inputs(*inputs, qk_config=config)
                runs["v_" + name] = lambda config=config: fp8_attention_inputs(*inputs, v_config=config)
            for name, fn in runs.items():
                us = time_us(fn)
                row = dict(tokens=tokens, block=block, kernel=name, us=round(us, 1), gb_per_s=round(moved / us / 1e3))
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_results(args.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 triton=__import__("triton").__version__), rows,
                  [("tokens", "tokens"), ("block", "block"), ("kernel", "kernel"), ("us", "us"), ("GB/s", "gb_per_s")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
