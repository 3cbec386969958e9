"""The fused FP8 attention kernel (Triton): one pass over K and V per block of queries, FlashAttention-style.

Written by hand because no library the pack can use has it: PyTorch 2.11's SDPA has no FP8 kernel
(its cuDNN and flash backends refuse float8 Q/K/V on an H100), FlashAttention-3's FP8 path is a
separate CUDA build for Hopper only that ComfyUI installs do not have (the pack builds it optionally, patched:
`fp8_attention_fa3.py`), and TensorRT's fused FP8 MHA runs only inside an engine. Triton ships with PyTorch.
Imported only where Triton is (see `fp8_attention.py`).

Per the recipe (what TensorRT's fused FP8 attention computes):
    S = Q8 K8^T * (q_scale * k_scale / sqrt(D))   FP8 operands, FP32 accumulation
    P = softmax(S)                               FP32, online (running max and sum, never stored)
    O = P8 V8 * v_scale                          P quantized to FP8 with amax 1 (scale 1/448), FP32 accumulation
The unnormalized P of the online softmax is in (0, 1], so it uses the same FP8 grid as the recipe's
normalized P; O is divided by the row sum at the end, in FP32.

Layouts: Q and K [B, H, L, D] (any strides, D contiguous); V given transposed, [B, H, D, L] with L
contiguous, because FP8 tensor-core MMAs on Hopper take both operands K-major and P x V reduces over L.
O is written as [B, L, H, D] in the output dtype, so the caller's [B, L, H*D] is a free view.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_attention import check_kv_shapes, check_qkv_scales
from .kernel_ops import launch

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, seq_len, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, QUANTIZE_P: tl.constexpr, PROMOTE_PV: tl.constexpr):
    """Folds one block of BLOCK_N keys into the running output. m_i is the running row max of the scores
    times qk_scale (log2 domain)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k)
    if MASKED:
        s = tl.where(offs_n[None, :] < seq_len, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    # 448 P, P on the FP8 grid with amax 1, straight from the exponent: 2^(s qk_scale - m + log2 448), one fused
    # multiply-add per score. The special-function units, the FP32 units and the tensor cores take turns here
    # (Triton does not overlap them as FlashAttention-3 does), so each FP32 operation per score shows: scaling
    # the scores and the rescale-and-add of acc as multiply-adds took the kernel from 1.348 to 1.281 ms on an
    # H100 at 8704 tokens. (FP16 exponentials, two per special-function op, measured slower: 1.401 vs 1.326
    # ms, the conversions costing more than the halved exponentials saved.)
    p = tl.math.exp2(s * qk_scale - (m_new - 8.807354922057604)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not QUANTIZE_P:  # only for checking the rest of the kernel exactly (see tests/test_fp8_attention.py)
        acc = acc * alpha[:, None] + tl.dot(p, tl.trans(v).to(tl.float32))
    elif PROMOTE_PV:
        # A fresh accumulator per block: Hopper's FP8 MMAs accumulate in reduced precision (Triton's default
        # there never promotes), so the sum over all L keys is carried in FP32 outside them.
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v))
    else:  # the sum over all keys inside the MMAs: only for the benchmark that shows what promotion costs
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(v), acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def fp8_attention_kernel(Q, K, Vt, O, Scales, sm_scale_log2, seq_len, num_heads,
                         stride_qb, stride_qh, stride_ql,
                         stride_kb, stride_kh, stride_kl,
                         stride_vb, stride_vh, stride_vd,
                         stride_ob, stride_oh, stride_ol,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         QUANTIZE_P: tl.constexpr, PROMOTE_PV: tl.constexpr):
    start_m = tl.program_id(0)
    qk_scale = tl.load(Scales) * tl.load(Scales + 1) * sm_scale_log2
    v_scale = tl.load(Scales + 2)
    off_bh = tl.program_id(1)
    b = off_bh // num_heads
    h = off_bh % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)
    # K^T tile [D, BLOCK_N] and V^T tile [D, BLOCK_N]: D-contiguous K and L-contiguous V^T are the K-major
    # operands of the two MMAs.
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kl + offs_d[:, None]
    v_ptrs = Vt + b * stride_vb + h * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_blocks_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_blocks_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs + start_n * stride_kl, v_ptrs + start_n, start_n,
                                      seq_len, qk_scale, BLOCK_N, False, QUANTIZE_P, PROMOTE_PV)
    if full_blocks_end < seq_len:  # the ragged last block: masked, once
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_ptrs + full_blocks_end * stride_kl,
                                      v_ptrs + full_blocks_end, full_blocks_end, seq_len, qk_scale, BLOCK_N, True, QUANTIZE_P,
                                      PROMOTE_PV)

    out = acc * (v_scale / l_i)[:, None]  # l_i sums 448 P, as acc does
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq_len)


# Candidates for the autotuner (best kept per sequence length and head width, timed at the first call).
# On an H100 at 8704 tokens 64 x 128 tiles, 4 warps, 3 stages are fastest (1.248 ms; the others 1.37-2.7 ms,
# benchmarks/results/kernels/attention_speed_fewer_ops_experiment_h100.json). On Hopper (wgmma) 3 stages of 64 x 128 take
# 104 KB of shared memory, 128 x 128 112 KB. For RTX 40xx / 50xx (sm_89 / sm_120, 99 KB a block) Triton lowers
# them to mma.sync in at most 96 KB, so every config fits there too, but the 128-key ones spill registers
# (8-640 bytes) and 128 x 64 with 8 warps does not (scripts/kernel_targets.py: compiled ahead of time on the
# CPU with Triton 3.4-3.8; tests/test_kernel_targets.py). No RTX card has run them; the autotuner times each
# at the first call.
CONFIGS = [
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128), num_warps=4, num_stages=2),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
]
tuned_fp8_attention_kernel = triton.autotune(configs=CONFIGS, key=["seq_len", "HEAD_DIM", "PROMOTE_PV"])(fp8_attention_kernel)


def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype, config: dict | None = None, quantize_p: bool = True,
                  promote_pv: bool = True) -> torch.Tensor:
    """q8, k8 [B, H, L, D] and vt8 [B, H, D, L], float8_e4m3fn; scales float32 [3] (Q, K, V) on their device
    -> O [B, L, H, D] in out_dtype.

    config (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner. quantize_p=False keeps P in FP32
    for P x V: not the recipe; it lets a test check everything else exactly under Triton's CPU interpreter,
    whose FP32 -> FP8 conversion mis-rounds values that round up into the next binade (Triton 3.8:
    125.7 -> 64, not 128). promote_pv=False lets P x V accumulate in the MMA's reduced precision across
    all keys (Triton's default on Hopper): only for the benchmark that shows what promotion costs and saves.
    """
    batch, heads, seq_len, head_dim = q8.shape
    check_kv_shapes(k8, "vt8", vt8, q8.shape, (batch, heads, head_dim, seq_len), "fp8_attention")
    for name, t in (("q8", q8), ("k8", k8), ("vt8", vt8)):
        if t.dtype != torch.float8_e4m3fn or t.stride(-1) != 1:
            raise ValueError(f"fp8_attention: {name} must be float8_e4m3fn with a contiguous last dimension, "
                             f"got {t.dtype} with strides {t.stride()}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"fp8_attention: head width {head_dim}; the kernel takes 16, 32, 64, 128 or 256")
    check_qkv_scales(scales, "fp8_attention")
    out = torch.empty(batch, seq_len, heads, head_dim, device=q8.device, dtype=out_dtype)
    args = (q8, k8, vt8, out, scales, head_dim ** -0.5 * LOG2E, seq_len, heads,
            q8.stride(0), q8.stride(1), q8.stride(2),
            k8.stride(0), k8.stride(1), k8.stride(2),
            vt8.stride(0), vt8.stride(1), vt8.stride(2),
            out.stride(0), out.stride(2), out.stride(1))
    launch(fp8_attention_kernel, tuned_fp8_attention_kernel,
           lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads), args, config,
           HEAD_DIM=head_dim, QUANTIZE_P=quantize_p, PROMOTE_PV=promote_pv)
    return out
