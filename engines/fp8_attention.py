"""Attention in FP8 per the recipe, at run time: the PyTorch backend's form of ModelOpt's QuantAttention.

Q, K and V are quantized to FP8 E4M3 with their calibrated per-tensor scales (in the op that
produces them, once a block is compiled: Inductor fuses the quantization into RMSNorm + RoPE), then

  - on CUDA GPUs with FP8 tensor cores (compute capability >= 8.9) and Triton: one fused kernel
    (`fp8_attention_triton.py`), exposed to torch.compile as the custom op `kontext_trt::fp8_attention`;
    on Hopper, where a build of FlashAttention-3's FP8 forward with the pack's patch is given
    (`fp8_attention_fa3.py`, `FP8Attention.fa3_library`), that kernel instead (`kontext_trt::fa3_fp8_attention`);
  - elsewhere: the recipe written out in PyTorch (FP32 QK^T and softmax, P quantized with amax 1),
    which is what ModelOpt's calibrated model computes, so CPU runs and tests see the same numbers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fp8 import FP8, FP8_MAX, quantize_fp8
from .kernel_ops import custom_op, triton_fp8_kernels_available
from .transformer import Attention

# Heads per chunk of the written-out attention: at 8704 tokens one head's FP32 scores are 300 MB.
HEADS_PER_CHUNK = 4


def _fused(q8: Tensor, k8: Tensor, vt8: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
    from .fp8_attention_triton import fp8_attention

    return fp8_attention(q8, k8, vt8, scales, out_dtype)


def _fused_shape(q8: Tensor, k8: Tensor, vt8: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
    batch, heads, seq_len, head_dim = q8.shape
    return q8.new_empty((batch, seq_len, heads, head_dim), dtype=out_dtype)


fused_fp8_attention = custom_op("fp8_attention", _fused, _fused_shape)


def _fa3(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, library: str) -> Tensor:
    from .fp8_attention_fa3 import load_fa3

    return load_fa3(library)(q8, k8, v8, scales)


def _fa3_shape(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, library: str) -> Tensor:
    batch, heads, seq_len, head_dim = q8.shape
    return q8.new_empty((batch, seq_len, heads, head_dim), dtype=torch.bfloat16)


fa3_fp8_attention = custom_op("fa3_fp8_attention", _fa3, _fa3_shape)


def _inputs(qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], q_norms: list[Tensor], k_norms: list[Tensor],
            pe: Tensor, scales: Tensor, transpose_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .fp8_attention_inputs_triton import fp8_attention_inputs

    return fp8_attention_inputs(qs, ks, vs, q_norms, k_norms, pe, scales, transpose_v=transpose_v)


# V^T rows start at multiples of this many elements (16 bytes in FP8): at L = 15650 unaligned rows cost the
# attention kernel half its speed (measured on an H100).
V_ROW_ALIGN = 16


def empty_transposed_v(batch: int, heads: int, head_dim: int, seq_len: int, device, dtype=FP8) -> Tensor:
    """An uninitialized V^T [B, H, D, L], L contiguous, each row starting V_ROW_ALIGN-aligned (padded storage)."""
    padded = -(-seq_len // V_ROW_ALIGN) * V_ROW_ALIGN
    return torch.empty(batch, heads, head_dim, padded, device=device, dtype=dtype)[..., :seq_len]


def check_qkv_scales(scales: Tensor, caller: str) -> None:
    """The FP8 attention kernels read the Q, K and V scales as one float32 [3] tensor on the device."""
    if scales.shape != (3,) or scales.dtype != torch.float32:
        raise ValueError(f"{caller}: scales must be float32 [3] (Q, K, V), got {scales.dtype} {tuple(scales.shape)}")


def check_kv_shapes(k8: Tensor, v_name: str, v8: Tensor, q_shape: tuple, v_shape: tuple, caller: str) -> None:
    """K must match Q's shape and V the layout its kernel takes (v_shape), before a launch reads past them."""
    for name, t, shape in (("k8", k8, q_shape), (v_name, v8, v_shape)):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{caller}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _inputs_shape(qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], q_norms: list[Tensor], k_norms: list[Tensor],
                  pe: Tensor, scales: Tensor, transpose_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, _, head_dim = qs[0].shape
    total = sum(q.shape[2] for q in qs)
    q8 = qs[0].new_empty((batch, heads, total, head_dim), dtype=FP8)
    v8 = empty_transposed_v(batch, heads, head_dim, total, qs[0].device) if transpose_v else torch.empty_like(q8)
    return q8, torch.empty_like(q8), v8


fused_fp8_attention_inputs = custom_op("fp8_attention_inputs", _inputs, _inputs_shape)


def quantize_transposed_for_kernel(v: Tensor, v_scale: Tensor) -> Tensor:
    """v [B, H, L, D] (16-bit) -> FP8 V^T [B, H, D, L] with L contiguous, as the kernel takes it, each row
    V_ROW_ALIGN-aligned (L padded in the storage, not in the view). Padded before quantizing: Inductor
    (PyTorch 2.11) cannot generate the FP8 fill value a padded FP8 copy needs."""
    seq_len = v.shape[2]
    vt = v.transpose(-1, -2)
    if seq_len % V_ROW_ALIGN:
        vt = F.pad(vt, (0, V_ROW_ALIGN - seq_len % V_ROW_ALIGN))
    return quantize_fp8(vt, v_scale).contiguous()[..., :seq_len]


def chunked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, score_scale, quantize_p: Callable[[Tensor], Tensor]
                              ) -> Tensor:
    """quantize_p(softmax(Q K^T * score_scale)) V in FP32, a few heads at a time: [B, H, L, D] -> [B, H, L, D].

    The recipe's attention written out, as ModelOpt's QuantAttention calibrates it and as the PyTorch
    backend runs it where the fused kernel cannot."""
    chunks = []
    for h in range(0, q.shape[1], HEADS_PER_CHUNK):
        qh, kh, vh = (t[:, h:h + HEADS_PER_CHUNK].float() for t in (q, k, v))
        p = torch.softmax((qh @ kh.transpose(-1, -2)) * score_scale, dim=-1)
        chunks.append(quantize_p(p) @ vh)
    return torch.cat(chunks, dim=1)


def fp8_attention_reference(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The recipe in PyTorch, as QuantAttention computes it: q8, k8, v8 [B, H, L, D] -> [B, L, H, D]."""
    q_scale, k_scale, v_scale = scales.float().unbind()
    out = chunked_softmax_attention(q8, k8, v8, q_scale * k_scale * q8.shape[-1] ** -0.5,
                                    lambda p: (p * FP8_MAX).to(FP8).float())  # P on the FP8 grid, in units of 1/448
    return (out * (v_scale / FP8_MAX)).transpose(1, 2).to(out_dtype)


class FP8Attention(Attention):
    """transformer.Attention in FP8: q, k, v [B, H, L, D] (16-bit, RoPE applied) -> [B, L, H*D].

    `attend` (QK-norm, RoPE, then attention) runs as two fused kernels where the Triton ones run: one makes
    the FP8 Q, K and V^T straight from the projections (`fp8_attention_inputs_triton.py`), one attends.
    fused_inputs=False leaves the first to Inductor (for the benchmark that compares them). fa3_library (a
    build of scripts/build_fa3_fp8.sh, on a Hopper GPU) makes FlashAttention-3's FP8 kernel attend in place
    of the Triton one; `fp8_attention_fa3.resolve_fa3_library` decides it."""

    fused_inputs = True
    fa3_library: str | None = None

    def __init__(self, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor):
        super().__init__()
        # One [3] tensor: the kernel reads the scales from device memory, so no host sync and no
        # recompilation when they change, and CUDA graphs can capture the call.
        self.register_buffer("scales", torch.stack([s.float().reshape(()) for s in (q_scale, k_scale, v_scale)]))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q_scale, k_scale, v_scale = self.scales.unbind()
        q8, k8 = quantize_fp8(q, q_scale), quantize_fp8(k, k_scale)
        if self.fa3_library is not None:
            out = fa3_fp8_attention(q8, k8, quantize_fp8(v, v_scale), self.scales, self.fa3_library).to(q.dtype)
        elif triton_fp8_kernels_available(q.device):
            out = fused_fp8_attention(q8, k8, quantize_transposed_for_kernel(v, v_scale), self.scales, q.dtype)
        else:
            out = fp8_attention_reference(q8, k8, quantize_fp8(v, v_scale), self.scales, q.dtype)
        return out.flatten(2)

    def attend(self, streams: list[tuple[Tensor, Tensor, Tensor, nn.Module]], pe: Tensor) -> Tensor:
        q = streams[0][0]
        if not (self.fused_inputs and triton_fp8_kernels_available(q.device)):
            return super().attend(streams, pe)
        q8, k8, v8 = fused_fp8_attention_inputs(
            [s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
            [s[3].query_norm.scale for s in streams], [s[3].key_norm.scale for s in streams], pe, self.scales,
            self.fa3_library is None)
        if self.fa3_library is not None:
            return fa3_fp8_attention(q8, k8, v8, self.scales, self.fa3_library).to(q.dtype).flatten(2)
        return fused_fp8_attention(q8, k8, v8, self.scales, q.dtype).flatten(2)
