"""GELU + FP8 quantization of the MLP's hidden activations in one pass (Triton), optionally behind a prefix
copied and quantized with them: out = FP8([prefix | GELU(x)] / scale), saturated to FP8's range.

The double blocks' MLPs run it on their hidden layer (x = fc1's output), the single blocks on linear1's MLP
part with the attention output as the prefix: exactly the tensor linear2 multiplies, written once.
Written by hand because Inductor's kernel for the same PyTorch (gelu_tanh_as_sigmoid, torch.cat, the FP8
quantization) walks the output as one flat index, dividing it by the row width for every element; this one
walks [rows, columns] tiles. On an H100 at 8704 tokens: 143.8 against 182.6 us for the single blocks' tensor,
111.4 against 128.4 us for the double blocks' (8192 tokens), 280.4 against 456.9 us at batch 2, with the same
FP8 bytes (benchmarks/results/kernels/gelu_fp8_speed_h100.json); 7.3 against 10.6 ms of a step's kernels. Imported
only where Triton is.

GELU is the tanh approximation (FLUX's), computed as x * sigmoid(2 z) = x * (1 + tanh(z)) / 2 in FP32,
as runtime_torch.gelu_tanh_as_sigmoid writes it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp8 import FP8
from .runtime_torch import GELU_SIGMOID_SCALE
ELEMENTS_PER_PROGRAM = 4096  # a [BLOCK_R, BLOCK_C] tile: 32 elements a thread at 4 warps


@triton.jit
def gelu_fp8_kernel(Prefix, stride_p, X, stride_x, Out, stride_o, Scale, rows,
                    N_PREFIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SIGMOID_SCALE: tl.constexpr):
    """One [BLOCK_R, BLOCK_C] tile of out; a tile lies wholly in the prefix or wholly in GELU(x)
    (BLOCK_C divides N_PREFIX)."""
    inv_scale = 1.0 / tl.load(Scale)  # once, not a division per element
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    rmask = r < rows
    r = r.to(tl.int64)  # a batch of 2 x 8704 tokens x 21504 columns is past int32
    if tl.program_id(1) * BLOCK_C < N_PREFIX:
        y = tl.load(Prefix + r * stride_p + c, mask=rmask).to(tl.float32)
    else:
        x = tl.load(X + r * stride_x + (c - N_PREFIX), mask=rmask).to(tl.float32)
        y = x * tl.sigmoid(SIGMOID_SCALE * (x + 0.044715 * x * x * x))
    y = tl.clamp(y * inv_scale, -448.0, 448.0)
    tl.store(Out + r * stride_o + c, y.to(Out.dtype.element_ty), mask=rmask)


def tile_columns(n_prefix: int, n_x: int) -> int:
    """The widest power-of-two column tile (<= 1024) that divides both parts; 0 when below 16 (not worth a kernel)."""
    g = math.gcd(n_prefix, n_x)
    width = min(1024, g & -g)
    return width if width >= 16 else 0


def gelu_fp8(x: torch.Tensor, scale: torch.Tensor, prefix: torch.Tensor | None = None,
             out_dtype: torch.dtype = FP8) -> torch.Tensor:
    """x [rows, n_x] (16-bit, last dimension contiguous: a column slice of a wider tensor is fine), prefix
    [rows, n_prefix] or None, scale float32 with one element -> out_dtype [rows, n_prefix + n_x].

    out_dtype=torch.float32 writes the values before FP8 rounding: for tests under Triton's CPU interpreter,
    whose FP32 -> FP8 conversion mis-rounds (see fp8_attention_triton.fp8_attention)."""
    rows, n_x = x.shape[0], x.shape[-1]
    n_prefix = 0 if prefix is None else prefix.shape[-1]
    for name, t, width in (("x", x, n_x), ("prefix", prefix, n_prefix)):
        if t is not None and (t.dim() != 2 or t.shape[0] != rows or t.stride(-1) != 1):
            raise ValueError(f"gelu_fp8: {name} must be [{rows}, {width}] with its last dimension contiguous, got "
                             f"shape {tuple(t.shape)} with strides {t.stride()}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"gelu_fp8: scale must be float32 with one element, got {scale.dtype} {tuple(scale.shape)}")
    block_c = tile_columns(n_prefix, n_x)
    if not block_c:
        raise ValueError(f"gelu_fp8: widths {n_prefix} and {n_x} share no power-of-two tile of >= 16 columns")
    out = torch.empty(rows, n_prefix + n_x, device=x.device, dtype=out_dtype)
    block_r = max(1, ELEMENTS_PER_PROGRAM // block_c)
    source = x if prefix is None else prefix
    grid = (triton.cdiv(rows, block_r), (n_prefix + n_x) // block_c)
    gelu_fp8_kernel[grid](source, source.stride(0), x, x.stride(0), out, out.stride(0), scale, rows, n_prefix,
                          block_r, block_c, GELU_SIGMOID_SCALE, num_warps=4)
    return out
