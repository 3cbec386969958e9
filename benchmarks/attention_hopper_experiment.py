"""Experiment (not the pack's kernel): the Gluon FA3-style FP8 attention (engines/fp8_attention_hopper.py)
against the Triton kernel on one H100, at 24 heads x 128.

    python benchmarks/attention_hopper_experiment.py [--out output/attention_hopper_experiment.json]

Checks each variant against the Triton kernel and float32 attention of the same FP8 inputs (8704, ragged
1000 and 100 tokens) and on flat rows (Q = 0: output mean over V's true mean, 1 is right), then times
(CUDA-graph replay, 8704 tokens) BLOCK_N 64 / 128, 2 / 3 stages, ping-pong on / off, keys permuted
(V^T in the order that makes P's registers the MMA operand as they are) and the diagnosis variants
(diag 1: no exponentials, diag 2: no P x V MMA; wrong numbers, timing only).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8 import FP8_MAX, quantize_fp8  # noqa: E402
from engines.fp8_attention import quantize_transposed_for_kernel  # noqa: E402
from engines.fp8_attention_hopper import fp8_attention_hopper, key_order  # noqa: E402
from engines.fp8_attention_triton import fp8_attention  # noqa: E402

HEADS, HEAD_DIM = 24, 128


def inputs(seq_len, flat=False):
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda") * s for s in (2.0, 2.0, 1.0))
    if flat:
        q, v = torch.zeros_like(q), torch.rand_like(v) * 0.5 + 0.5
    scales = torch.stack([t.abs().max().clamp_min(1e-6) / FP8_MAX for t in (q, k, v)]).float()
    return quantize_fp8(q, scales[0]), quantize_fp8(k, scales[1]), quantize_transposed_for_kernel(v, scales[2]), scales


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="output/attention_hopper_experiment.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = {f"bn{bn}_st{st}_pp{int(pp)}_kp{int(kp)}": dict(block_n=bn, stages=st, pingpong=pp, keys_permuted=kp)
                for bn, st, pp, kp in itertools.product([64, 128], [2, 3], [False, True], [False, True])}
    result = dict(device=torch.cuda.get_device_name(), accuracy={}, ms_8704={})
    for seq_len, flat in ((8704, False), (1000, False), (100, False), (8704, True)):
        q8, k8, vt8, scales = inputs(seq_len, flat)
        permuted = vt8[..., key_order(seq_len).to(vt8.device)].contiguous() if seq_len % 32 == 0 else None
        triton_out = fp8_attention(q8, k8, vt8, scales, torch.float32)
        exact = F.scaled_dot_product_attention(q8.float() * scales[0], k8.float() * scales[1],
                                               vt8.float().transpose(-1, -2) * scales[2]).transpose(1, 2)
        true_mean = (vt8.float() * scales[2]).mean(-1).unsqueeze(1)  # [1, 1, H, D]
        row = dict(triton_vs_exact=rel(triton_out, exact), triton_flat=(triton_out.mean(1, True) / true_mean).mean().item())
        for name, kw in variants.items():
            if kw["keys_permuted"] and permuted is None:
                continue
            out = fp8_attention_hopper(q8, k8, permuted if kw["keys_permuted"] else vt8, scales, torch.float32, **kw)
            row[name] = dict(vs_triton=rel(out, triton_out), vs_exact=rel(out, exact),
                             flat=(out.mean(1, True) / true_mean).mean().item() if flat else None)
        result["accuracy"][f"{seq_len}{'_flat' if flat else ''}"] = row
        print(seq_len, flat, row, flush=True)
    q8, k8, vt8, scales = inputs(8704)
    permuted = vt8[..., key_order(8704).to(vt8.device)].contiguous()
    result["ms_8704"]["triton"] = do_bench_cudagraph(lambda: fp8_attention(q8, k8, vt8, scales, torch.bfloat16), rep=300)
    timed = dict(variants)
    timed.update({f"bn128_st3_pp{int(pp)}_kp1_diag{d}": dict(block_n=128, stages=3, pingpong=pp, keys_permuted=True, diag=d)
                  for pp in (False, True) for d in (1, 2)})
    for name, kw in timed.items():
        v = permuted if kw["keys_permuted"] else vt8
        result["ms_8704"][name] = do_bench_cudagraph(
            lambda kw=kw, v=v: fp8_attention_hopper(q8, k8, v, scales, torch.bfloat16, **kw), rep=300)
        print(name, result["ms_8704"][name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
