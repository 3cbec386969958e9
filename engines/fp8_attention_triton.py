"""The fused FP8 attention kernel (Triton): one pass over K and V per block of queries, FlashAttention-style.

Written by hand because no library the pack can use has it: PyTorch 2.11's SDPA has no FP8 kernel
(its cuDNN and flash backends refuse float8 Q/K/V on an H100), FlashAttention-3's FP8 path is a
separate CUDA build ComfyUI installs do not have, and TensorRT's fused FP8 MHA runs only inside an
engine. Triton ships with PyTorch. Imported only where Triton is (see `fp8_attention.py`).

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

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_times_v(acc, l_i, m_i, s, vt, start_n, seq_len, qk_scale,
                     BLOCK_N: tl.constexpr, MASKED: tl.constexpr, QUANTIZE_P: tl.constexpr, PROMOTE_PV: tl.constexpr,
                     FEWER_OPS: tl.constexpr):
    """Folds one block of BLOCK_N keys into the running output: s = Q K^T of the block (unscaled), vt its
    V^T tile [D, BLOCK_N]. m_i is the running row max in the log2 domain (scores times qk_scale)."""
    if MASKED:
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < seq_len, s, float("-inf"))
    if FEWER_OPS:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        # 448 P, P on the FP8 grid with amax 1, straight from the exponent: 2^(s qk_scale - m + log2 448), one
        # fused multiply-add per score.
        p = tl.math.exp2(s * qk_scale - (m_new - 8.807354922057604)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANTIZE_P:
            # A fresh accumulator per block: Hopper's FP8 MMAs accumulate in reduced precision, so the sum over
            # all L keys is carried in FP32 outside them (what max_num_imprecise_acc=BLOCK_N does), and the
            # rescale and the add are one multiply-add.
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
        else:
            pv = tl.dot(p, tl.trans(vt).to(tl.float32))
        acc = acc * alpha[:, None] + pv
        return acc, l_i, m_new
    s = s * qk_scale  # log2 domain: exp2 below
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - (m_new - 8.807354922057604)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if QUANTIZE_P and PROMOTE_PV:
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
    elif QUANTIZE_P:
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
    else:  # only for checking the rest of the kernel exactly (see tests/test_fp8_attention.py)
        acc = tl.dot(p, tl.trans(vt).to(tl.float32), acc)
    return acc, l_i, m_new


@triton.jit
def _key_tiles(k_src, v_src, start_n, seq_len, stride_kl, stride_vd,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """K^T and V^T tiles [D, BLOCK_N] of keys start_n...: D-contiguous K and L-contiguous V^T are the K-major
    operands of the two MMAs. With descriptors, rows past seq_len read as zeros (masked by the softmax)."""
    if TMA:
        kt = k_src.load([start_n, 0]).T
        vt = v_src.load([0, start_n])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_ptrs = k_src + offs_n[None, :] * stride_kl + offs_d[:, None]
        v_ptrs = v_src + offs_d[:, None] * stride_vd + offs_n[None, :]
        if MASKED:
            kt = tl.load(k_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
            vt = tl.load(v_ptrs, mask=offs_n[None, :] < seq_len, other=0.0)
        else:
            kt = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
    return kt, vt


@triton.jit
def fp8_attention_kernel(Q, K, Vt, O, Scales, sm_scale_log2, seq_len, num_heads,
                         stride_qb, stride_qh, stride_ql,
                         stride_kb, stride_kh, stride_kl,
                         stride_vb, stride_vh, stride_vd,
                         stride_ob, stride_oh, stride_ol,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         QUANTIZE_P: tl.constexpr, PROMOTE_PV: tl.constexpr, TMA: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, FEWER_OPS: tl.constexpr):
    start_m = tl.program_id(0)
    qk_scale = tl.load(Scales) * tl.load(Scales + 1) * sm_scale_log2
    v_scale = tl.load(Scales + 2)
    off_bh = tl.program_id(1)
    b = off_bh // num_heads
    h = off_bh % num_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    Vt += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:
        # One 2-D descriptor per (batch, head): the copy engine reads rows past seq_len as zeros and clips
        # them on store, so any strides and a ragged last block need no masks on memory.
        k_src = tl.make_tensor_descriptor(K, [seq_len, HEAD_DIM], [stride_kl, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(Vt, [HEAD_DIM, seq_len], [stride_vd, 1], [HEAD_DIM, BLOCK_N])
        q = tl.make_tensor_descriptor(Q, [seq_len, HEAD_DIM], [stride_ql, 1], [BLOCK_M, HEAD_DIM]).load(
            [start_m * BLOCK_M, 0])
    else:
        k_src = K
        v_src = Vt
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_blocks_end = (seq_len // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, full_blocks_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        kt, vt = _key_tiles(k_src, v_src, start_n, seq_len, stride_kl, stride_vd, HEAD_DIM, BLOCK_N, False, TMA)
        acc, l_i, m_i = _softmax_times_v(acc, l_i, m_i, tl.dot(q, kt), vt, start_n, seq_len, qk_scale,
                                         BLOCK_N, False, QUANTIZE_P, PROMOTE_PV, FEWER_OPS)
    if full_blocks_end < seq_len:  # the ragged last block: masked, once
        kt, vt = _key_tiles(k_src, v_src, full_blocks_end, seq_len, stride_kl, stride_vd, HEAD_DIM, BLOCK_N, True, TMA)
        acc, l_i, m_i = _softmax_times_v(acc, l_i, m_i, tl.dot(q, kt), vt, full_blocks_end, seq_len, qk_scale,
                                         BLOCK_N, True, QUANTIZE_P, PROMOTE_PV, FEWER_OPS)

    out = (acc * (v_scale / l_i)[:, None]).to(O.dtype.element_ty)  # l_i sums 448 P, as acc does
    if TMA:
        tl.make_tensor_descriptor(O, [seq_len, HEAD_DIM], [stride_ol, 1], [BLOCK_M, HEAD_DIM]).store(
            [start_m * BLOCK_M, 0], out)
    else:
        tl.store(O + offs_m[:, None] * stride_ol + offs_d[None, :], out, mask=offs_m[:, None] < seq_len)


# Candidates for the autotuner (best kept per sequence length and head width, timed at the first call).
# 128 x 128 tiles with 3 stages need ~112 KB of shared memory: Hopper and datacenter Ada have it,
# RTX 40xx (99 KB per block) do not, and the autotuner skips what does not fit.
CONFIGS = [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
]
tuned_fp8_attention_kernel = triton.autotune(configs=CONFIGS, key=["seq_len", "HEAD_DIM", "TMA", "WARP_SPECIALIZE", "FEWER_OPS"])(
    fp8_attention_kernel)


def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype, config: dict | None = None, quantize_p: bool = True,
                  promote_pv: bool = True, tma: bool | None = None, warp_specialize: bool = False,
                  fewer_ops: bool = True) -> torch.Tensor:
    """q8, k8 [B, H, L, D] and vt8 [B, H, D, L], float8_e4m3fn; scales float32 [3] (Q, K, V) on their device
    -> O [B, L, H, D] in out_dtype.

    config (BLOCK_M, BLOCK_N, num_warps, num_stages) skips the autotuner. quantize_p=False keeps P in FP32
    for P x V: not the recipe; it lets a test check everything else exactly under Triton's CPU interpreter,
    whose FP32 -> FP8 conversion mis-rounds values that round up into the next binade (Triton 3.8:
    125.7 -> 64, not 128). promote_pv=False lets P x V accumulate in the MMA's reduced precision across
    all keys (Triton's default on Hopper): only for the benchmark that shows what promotion costs and saves.
    """
    batch, heads, seq_len, head_dim = q8.shape
    for name, t, shape in (("k8", k8, q8.shape), ("vt8", vt8, (batch, heads, head_dim, seq_len))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"fp8_attention: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    for name, t in (("q8", q8), ("k8", k8), ("vt8", vt8)):
        if t.dtype != torch.float8_e4m3fn or t.stride(-1) != 1:
            raise ValueError(f"fp8_attention: {name} must be float8_e4m3fn with a contiguous last dimension, "
                             f"got {t.dtype} with strides {t.stride()}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"fp8_attention: head width {head_dim}; the kernel takes 16, 32, 64, 128 or 256")
    if scales.shape != (3,) or scales.dtype != torch.float32:
        raise ValueError(f"fp8_attention: scales must be float32 [3] (Q, K, V), got {scales.dtype} {tuple(scales.shape)}")
    out = torch.empty(batch, seq_len, heads, head_dim, device=q8.device, dtype=out_dtype)
    args = (q8, k8, vt8, out, scales, head_dim ** -0.5 * LOG2E, seq_len, heads,
            q8.stride(0), q8.stride(1), q8.stride(2),
            k8.stride(0), k8.stride(1), k8.stride(2),
            vt8.stride(0), vt8.stride(1), vt8.stride(2),
            out.stride(0), out.stride(2), out.stride(1))
    if tma is None:
        tma = tma_available(q8.device, (q8, k8, vt8, out))
    if tma:
        _ensure_allocator()
    flags = dict(HEAD_DIM=head_dim, QUANTIZE_P=quantize_p, PROMOTE_PV=promote_pv, TMA=tma,
                 WARP_SPECIALIZE=warp_specialize, FEWER_OPS=fewer_ops and promote_pv)
    if config is None:
        grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        tuned_fp8_attention_kernel[grid](*args, **flags)
    else:
        cfg = dict(config)
        grid = (triton.cdiv(seq_len, cfg["BLOCK_M"]), batch * heads)
        fp8_attention_kernel[grid](*args, **flags, **cfg)
    return out


def tma_available(device: torch.device, tensors) -> bool:
    """The tensor-memory accelerator (compute capability >= 9.0) takes tiles whose row strides and bases are
    16-byte aligned; under Triton's CPU interpreter the descriptors are emulated."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def _ensure_allocator() -> None:
    """Descriptors made in the kernel need a little global memory per launch, which Triton asks a
    process-wide allocator for; set one (PyTorch's caching allocator) only if nobody has."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=_device()))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
