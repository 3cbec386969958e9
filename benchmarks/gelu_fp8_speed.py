"""The MLPs' GELU + FP8 quantization at Kontext's sizes on one GPU: the fused kernel (gelu_fp8_triton.py)
against the same PyTorch under torch.compile (what the compiled blocks ran before it), in one run.

    python benchmarks/gelu_fp8_speed.py [--tokens 8704] [--batch 1,2] [--out output/gelu_fp8_speed.json]

Cases: a single block's linear2 input ([attention output 3072 | GELU(linear1's MLP part 12288)], the MLP part
a column slice of linear1's 21504-wide output) over batch x tokens rows, and a double block's image MLP
(GELU of fc1's 12288-wide output) over batch x (tokens - 512) rows. Reports microseconds per call
(triton.testing.do_bench, median), the bandwidth of moving the bytes once (16-bit read, FP8 written), and
the fraction of FP8 bytes that differ from the compiled PyTorch's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import quantize_fp8  # noqa: E402
from engines.gelu_fp8_triton import gelu_fp8  # noqa: E402
from engines.runtime_torch import gelu_tanh_as_sigmoid  # noqa: E402

from results_table import write_results  # noqa: E402

HIDDEN, MLP, TEXT = 3072, 12288, 512


def pytorch_form(x, scale, prefix):
    """What the compiled blocks ran: SigmoidGELU, the concatenation, FP8Linear's input quantization."""
    hidden = gelu_tanh_as_sigmoid(x)
    return quantize_fp8(hidden if prefix is None else torch.cat((prefix, hidden), dim=-1), scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8704)
    p.add_argument("--batch", default="1,2")
    p.add_argument("--out", default="output/gelu_fp8_speed.json")
    args = p.parse_args(argv)
    from triton.testing import do_bench

    compiled = torch.compile(pytorch_form)
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = torch.tensor(6.0 / 448, device="cuda")
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for case in ("single_block", "double_block_image"):
            n = batch * (args.tokens if case == "single_block" else args.tokens - TEXT)
            if case == "single_block":
                x = (torch.randn(n, 3 * HIDDEN + MLP, device="cuda", generator=g, dtype=torch.bfloat16) * 2)[:, 3 * HIDDEN:]
                prefix = torch.randn(n, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16)
            else:
                x = torch.randn(n, MLP, device="cuda", generator=g, dtype=torch.bfloat16) * 2
                prefix = None
            moved = x.numel() * 2 + (0 if prefix is None else prefix.numel() * 2) + n * (MLP + (0 if prefix is None else HIDDEN))
            want = compiled(x, scale, prefix)
            got = gelu_fp8(x, scale, prefix)
            differ = (got.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()
            for name, fn in (("fused_kernel", lambda: gelu_fp8(x, scale, prefix)),
                             ("pytorch_compiled", lambda: compiled(x, scale, prefix))):
                us = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
                rows.append(dict(case=case, batch=batch, rows=n, kernel=name, us=round(us, 1),
                                 tb_per_s=round(moved / us / 1e6, 2), fp8_bytes_differing=differ))
                print(rows[-1], flush=True)
    write_results(args.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 triton=__import__("triton").__version__), rows,
                  [("case", "case"), ("batch", "batch"), ("rows", "rows"), ("kernel", "kernel"), ("us", "us"),
                   ("TB/s", "tb_per_s"), ("FP8 bytes differing", "fp8_bytes_differing")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
