"""The FP8 attention's inputs in one pass (Triton): QK-norm, RoPE and FP8 quantization of Q and K, and V
quantized (transposed for the Triton attention kernel, in rows for FlashAttention-3's), read straight from
the QKV projection's output.

Written by hand because Inductor, given the same PyTorch (`transformer.Attention.attend` followed by
the quantization), splits it into a reduction per RMSNorm, a pass for RoPE and the concatenation of a
double block's two streams, and one per FP8 copy: on an H100 at 8704 tokens 0.20 ms per single block
and 0.33 per double block, where moving the bytes once takes ~0.07; these kernels take 0.10 and 0.12
(benchmarks/attention_inputs_speed.py), 5.6 ms less per step. Imported only where Triton is (see
`fp8_attention.py`).

Per stream (a double block has two, text then image, each with its own norms), per token and head:
    q8 = fp8(rope(rmsnorm(q) * q_norm) / q_scale), k8 likewise, vt8 = fp8(v / v_scale) transposed (or v8 not)
with the 16-bit roundings of the PyTorch form (the norm's output and RoPE's are 16-bit there), so the
FP8 values are those of `Attention.attend` quantized, apart from FP32 rounding order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_attention import check_qkv_scales, empty_transposed_v


RMS_EPS = tl.constexpr(1e-6)  # transformer.RMSNorm's


@triton.jit
def _norm_rope_quantize(x, norm_scale, pe00, pe01, pe10, pe11, scale,
                        BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x [BLOCK_L, HEAD_DIM] (FP32 from 16-bit) -> rope(rmsnorm(x) * norm_scale) / scale on FP8's range, in FP32."""
    dtype = norm_scale.dtype
    rrms = tl.math.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + RMS_EPS)
    # The 16-bit product of two 16-bit values, formed exactly in FP32 and rounded once.
    x = ((x * rrms[:, None]).to(dtype).to(tl.float32) * norm_scale.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    # RoPE rotates consecutive pairs: the pairs are the last axis of a [BLOCK_L, HEAD_DIM / 2, 2] view.
    x0, x1 = tl.split(tl.reshape(x, [BLOCK_L, HEAD_DIM // 2, 2]))
    r0 = (pe00 * x0 + pe01 * x1).to(dtype).to(tl.float32)
    r1 = (pe10 * x0 + pe11 * x1).to(dtype).to(tl.float32)
    x = tl.reshape(tl.join(r0, r1), [BLOCK_L, HEAD_DIM])
    return tl.clamp(x / scale, -448.0, 448.0)


@triton.jit
def fp8_attention_inputs_kernel(Q, K, V, QNorm, KNorm, PE, Scales, Q8, K8, Vt8,
                                seq_len, seq_offset, num_heads,
                                stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                                stride_vb, stride_vh, stride_vl,
                                stride_pb, stride_pl,
                                stride_ob, stride_oh, stride_ol,
                                stride_tb, stride_th, stride_td,
                                HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
                                WRITE_V: tl.constexpr, TRANSPOSE_V: tl.constexpr):
    """Writes q8 and k8, or (WRITE_V) vt8 (TRANSPOSE_V; else v8 in q8's layout, into Vt8 with q8's strides):
    two launches, as each is fastest in its own token tiles."""
    b = tl.program_id(2)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_seq = offs_l < seq_len
    offs_d = tl.arange(0, HEAD_DIM)
    first_head = tl.program_id(1) * HEADS_PER_PROGRAM
    out_dtype = Q8.dtype.element_ty
    if not WRITE_V:
        offs_pair = tl.arange(0, HEAD_DIM // 2)
        # pe [B, 1, L, D/2, 2, 2]: each pair's 2 x 2 rotation, read once for all of this program's heads.
        pe_ptrs = PE + b * stride_pb + (seq_offset + offs_l)[:, None] * stride_pl + offs_pair[None, :] * 4
        pe00 = tl.load(pe_ptrs, mask=in_seq[:, None], other=0.0)
        pe01 = tl.load(pe_ptrs + 1, mask=in_seq[:, None], other=0.0)
        pe10 = tl.load(pe_ptrs + 2, mask=in_seq[:, None], other=0.0)
        pe11 = tl.load(pe_ptrs + 3, mask=in_seq[:, None], other=0.0)
        q_norm = tl.load(QNorm + offs_d)
        k_norm = tl.load(KNorm + offs_d)
        q_scale = tl.load(Scales)
        k_scale = tl.load(Scales + 1)
        for h in range(first_head, tl.minimum(first_head + HEADS_PER_PROGRAM, num_heads)):
            o_off = b * stride_ob + h * stride_oh + (seq_offset + offs_l)[:, None] * stride_ol + offs_d[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :],
                        mask=in_seq[:, None], other=0.0).to(tl.float32)
            q8 = _norm_rope_quantize(q, q_norm, pe00, pe01, pe10, pe11, q_scale, BLOCK_L, HEAD_DIM)
            tl.store(Q8 + o_off, q8.to(out_dtype), mask=in_seq[:, None])
            k = tl.load(K + b * stride_kb + h * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :],
                        mask=in_seq[:, None], other=0.0).to(tl.float32)
            k8 = _norm_rope_quantize(k, k_norm, pe00, pe01, pe10, pe11, k_scale, BLOCK_L, HEAD_DIM)
            tl.store(K8 + o_off, k8.to(out_dtype), mask=in_seq[:, None])
    else:
        v_scale = tl.load(Scales + 2)
        for h in range(first_head, tl.minimum(first_head + HEADS_PER_PROGRAM, num_heads)):
            v = tl.load(V + b * stride_vb + h * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :],
                        mask=in_seq[:, None], other=0.0).to(tl.float32)
            v8 = tl.clamp(v / v_scale, -448.0, 448.0).to(out_dtype)
            if TRANSPOSE_V:
                vt_ptrs = Vt8 + b * stride_tb + h * stride_th + offs_d[:, None] * stride_td + (seq_offset + offs_l)[None, :]
                tl.store(vt_ptrs, tl.trans(v8), mask=in_seq[None, :])
            else:
                v_off = b * stride_ob + h * stride_oh + (seq_offset + offs_l)[:, None] * stride_ol + offs_d[None, :]
                tl.store(Vt8 + v_off, v8, mask=in_seq[:, None])


# Tile configs (BLOCK_L tokens, HEADS_PER_PROGRAM, num_warps), fixed rather than autotuned: autotuning eight
# candidates added ~20 s to the first step. On an H100 at 8704 tokens (benchmarks/attention_inputs_speed.py
# --more-configs, results/kernels/attention_inputs_speed_h100.json) these were the fastest for a double block and within
# 6% of the fastest for a single one; Q and K run fastest in tiles of 16 tokens, V (its transposed rows are
# stored a tile wide) in tiles of 32. One launch writing all three took 7.3 ms of a step's profile, the two 6.4.
QK_CONFIG = dict(BLOCK_L=16, HEADS_PER_PROGRAM=8, num_warps=8)
V_CONFIG = dict(BLOCK_L=32, HEADS_PER_PROGRAM=1, num_warps=4)


def fp8_attention_inputs(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
                         q_norms: list[torch.Tensor], k_norms: list[torch.Tensor], pe: torch.Tensor,
                         scales: torch.Tensor, qk_config: dict | None = None, v_config: dict | None = None,
                         out_dtype: torch.dtype = torch.float8_e4m3fn, transpose_v: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams i = 0, 1, ...: q, k, v [B, H, L_i, D] (16-bit, any strides with D contiguous: views of the QKV
    projection's output), their QK-norms' scales [D]; pe [B or 1, 1, sum L_i, D/2, 2, 2] float32 over
    the streams concatenated in order; scales float32 [3] (Q, K, V) -> q8, k8 [B, H, L, D] and vt8 [B, H, D, L]
    (L contiguous, rows 16-byte aligned; transpose_v=False: v8 [B, H, L, D] like q8, as FlashAttention-3 takes it),
    float8_e4m3fn, the streams concatenated along L. qk_config and
    v_config (BLOCK_L, HEADS_PER_PROGRAM, num_warps) replace QK_CONFIG and V_CONFIG. out_dtype=torch.float32 writes the values before their
    rounding to FP8: for tests under Triton's CPU interpreter, whose FP8 conversion mis-rounds (see
    fp8_attention_triton.fp8_attention)."""
    batch, heads, _, head_dim = qs[0].shape
    total = sum(q.shape[2] for q in qs)
    if tuple(pe.shape) not in ((batch, 1, total, head_dim // 2, 2, 2), (1, 1, total, head_dim // 2, 2, 2)):
        raise ValueError(f"fp8_attention_inputs: pe has shape {tuple(pe.shape)}, expected "
                         f"({batch} or 1, 1, {total}, {head_dim // 2}, 2, 2)")
    if pe.dtype != torch.float32 or pe.stride()[-3:] != (4, 2, 1):
        raise ValueError(f"fp8_attention_inputs: pe must be float32 with contiguous 2 x 2 rotations, got {pe.dtype} "
                         f"with strides {pe.stride()}")
    check_qkv_scales(scales, "fp8_attention_inputs")
    for i, (q, k, v, q_norm, k_norm) in enumerate(zip(qs, ks, vs, q_norms, k_norms, strict=True)):
        if not q.shape == k.shape == v.shape or q.shape[:2] != (batch, heads) or q.shape[3] != head_dim \
                or any(t.stride(-1) != 1 for t in (q, k, v)):
            raise ValueError(f"fp8_attention_inputs: stream {i}'s q, k, v must each be [{batch}, {heads}, L, {head_dim}] "
                             f"with D contiguous; got {[tuple(t.shape) for t in (q, k, v)]} with strides "
                             f"{[t.stride() for t in (q, k, v)]}")
        if q_norm.shape != (head_dim,) or k_norm.shape != (head_dim,) or q_norm.dtype != q.dtype or k_norm.dtype != q.dtype:
            raise ValueError(f"fp8_attention_inputs: stream {i}'s norm scales must be [{head_dim}] in {q.dtype}, got "
                             f"{q_norm.dtype} {tuple(q_norm.shape)} and {k_norm.dtype} {tuple(k_norm.shape)}")
    device = qs[0].device
    q8 = torch.empty(batch, heads, total, head_dim, device=device, dtype=out_dtype)
    k8 = torch.empty_like(q8)
    vt8 = empty_transposed_v(batch, heads, head_dim, total, device, out_dtype) if transpose_v else torch.empty_like(q8)
    pe = pe.expand(batch, *pe.shape[1:])
    offset = 0
    for q, k, v, q_norm, k_norm in zip(qs, ks, vs, q_norms, k_norms):
        seq_len = q.shape[2]
        args = (q, k, v, q_norm.contiguous(), k_norm.contiguous(), pe, scales, q8, k8, vt8, seq_len, offset, heads,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], pe.stride(0), pe.stride(2),
                q8.stride(0), q8.stride(1), q8.stride(2), vt8.stride(0), vt8.stride(1), vt8.stride(2))
        for write_v, config in ((False, qk_config or QK_CONFIG), (True, v_config or V_CONFIG)):
            grid = (triton.cdiv(seq_len, config["BLOCK_L"]), triton.cdiv(heads, config["HEADS_PER_PROGRAM"]), batch)
            fp8_attention_inputs_kernel[grid](*args, HEAD_DIM=head_dim, WRITE_V=write_v, TRANSPOSE_V=transpose_v,
                                              **config)
        offset += seq_len
    return q8, k8, vt8
