"""The weight-only FP8 GEMV kernel (Triton): out [R, N] = x [R, K] @ (w8 [N, K] * row_scales[:, None])^T + bias.

Written by hand because nothing the pack can use reads FP8 weights against 16-bit activations at the
memory's speed: torch._scaled_mm needs both operands in FP8 (quantizing the modulation's activations
was the recipe's largest FP8 error, so they stay 16-bit), and Inductor's reduction over the fused
3.2 GB modulation weight ran at ~0.6 TB/s on an H100 (5.6 ms a step). Each program reads BLOCK_N
weight rows once, widens them to 16 bits (exact: E4M3 fits in BF16) and lets the tensor cores do the
few-row product with FP32 accumulation, so the time is the weight read. Imported only where Triton is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_ops import launch

MAX_ROWS = 16  # rows of x (samples in a batch) one launch takes: the MMA's smallest N


@triton.jit
def fp8_gemv_kernel(X, W, RowScales, Bias, Out, rows, n, k, stride_xr, stride_wn, stride_or,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EXACT_FP32: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn  # the fused modulation weight is 3.2 GB: past int32
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    for start_k in range(0, k, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + offs_k[None, :],
                    mask=(offs_n[:, None] < n) & (offs_k[None, :] < k), other=0.0)
        xt = tl.load(X + offs_r[None, :] * stride_xr + offs_k[:, None],
                     mask=(offs_r[None, :] < rows) & (offs_k[:, None] < k), other=0.0)  # x^T [BLOCK_K, BLOCK_R]
        if EXACT_FP32:  # float32 activations (CPU-sized tests, float32 models): no TF32 rounding
            acc = tl.dot(w.to(tl.float32), xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    out = acc * tl.load(RowScales + offs_n, mask=offs_n < n, other=0.0)[:, None]
    out += tl.load(Bias + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)[:, None]
    tl.store(Out + offs_r[None, :] * stride_or + offs_n[:, None], out.to(Out.dtype.element_ty),
             mask=(offs_r[None, :] < rows) & (offs_n[:, None] < n))


CONFIGS = [
    triton.Config(dict(BLOCK_N=64, BLOCK_K=128), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_K=256), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_K=128), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=32, BLOCK_K=256), num_warps=4, num_stages=4),
]
tuned_fp8_gemv_kernel = triton.autotune(configs=CONFIGS, key=["n", "k", "EXACT_FP32"])(fp8_gemv_kernel)


def fp8_gemv(x: torch.Tensor, weight_fp8: torch.Tensor, row_scales: torch.Tensor, bias: torch.Tensor,
             config: dict | None = None) -> torch.Tensor:
    """x [R, K] (R <= MAX_ROWS, 16- or 32-bit) @ (weight_fp8 [N, K] * row_scales [N])^T + bias [N] -> [R, N]
    in x's dtype, accumulated in FP32. config (BLOCK_N, BLOCK_K, num_warps, num_stages) skips the autotuner."""
    rows, k = x.shape
    n = weight_fp8.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"fp8_gemv: x has {rows} rows; the kernel takes at most {MAX_ROWS}")
    if weight_fp8.shape != (n, k) or weight_fp8.dtype != torch.float8_e4m3fn or weight_fp8.stride(1) != 1:
        raise ValueError(f"fp8_gemv: weight_fp8 must be float8_e4m3fn [{n}, {k}] with contiguous rows, got "
                         f"{weight_fp8.dtype} {tuple(weight_fp8.shape)} strides {weight_fp8.stride()}")
    if row_scales.shape != (n,) or bias.shape != (n,) or row_scales.dtype != torch.float32:
        raise ValueError(f"fp8_gemv: row_scales (float32) and bias must be [{n}], got {row_scales.dtype} "
                         f"{tuple(row_scales.shape)} and {tuple(bias.shape)}")
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    args = (x, weight_fp8, row_scales, bias, out, rows, n, k, x.stride(0), weight_fp8.stride(0), out.stride(0))
    launch(fp8_gemv_kernel, tuned_fp8_gemv_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),), args, config,
           BLOCK_R=MAX_ROWS, EXACT_FP32=x.dtype == torch.float32)
    return out
