"""The weight-only FP8 GEMV kernel (under Triton's CPU interpreter here, on the GPU when marked cuda) against
F.linear of the dequantized weights."""
import os

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import interpreted_kernel_module, needs_fp8_gpu

from engines.fp8 import FP8_MAX, quantize_fp8


def gemv_inputs(rows, n, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # Three "layers" with their own scales, fused row-wise as FusedModulation holds them.
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    weights = [torch.randn(size, k, generator=g) * (i + 1) for i, size in enumerate(sizes)]
    scales = [w.abs().max() / FP8_MAX for w in weights]
    w8 = torch.cat([quantize_fp8(w, s) for w, s in zip(weights, scales)])
    row_scales = torch.cat([s.expand(size) for s, size in zip(scales, sizes)]).float()
    bias, x = torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    want = F.linear(x.to(dtype).double(), w8.double() * row_scales.double()[:, None], bias.to(dtype).double())
    return [t.to(device) for t in (x.to(dtype), w8, row_scales, bias.to(dtype))], want


@pytest.fixture
def gemv_module():
    return interpreted_kernel_module("engines.fp8_gemv_triton")


# n and k not multiples of the tiles: masked rows and a ragged last K block. float32 activations: Triton 3.8's
# interpreter computes BF16 dots wrongly (~1e10 off), so the BF16 path is checked on the GPU only (below).
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_gemv_is_the_dequantized_linear(gemv_module, rows):
    args, want = gemv_inputs(rows, n=100, k=200, dtype=torch.float32, seed=rows)
    got = gemv_module.fp8_gemv(*args, config=dict(BLOCK_N=32, BLOCK_K=64))
    assert got.shape == (rows, 100) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


def test_gemv_refuses_wrong_inputs_by_name(gemv_module):
    (x, w8, row_scales, bias), _ = gemv_inputs(2, n=48, k=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="x has 17 rows; the kernel takes at most 16"):
        gemv_module.fp8_gemv(torch.zeros(17, 64), w8, row_scales, bias)
    with pytest.raises(ValueError, match="weight_fp8 must be float8_e4m3fn"):
        gemv_module.fp8_gemv(x, w8.float(), row_scales, bias)
    with pytest.raises(ValueError, match=r"row_scales \(float32\) and bias must be \[48\]"):
        gemv_module.fp8_gemv(x, w8, row_scales[:5], bias)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_gemv_on_the_gpu_is_the_dequantized_linear(rows):
    assert os.environ.get("TRITON_INTERPRET", "0") == "0"
    from engines.fp8_gemv_triton import fp8_gemv

    args, want = gemv_inputs(rows, n=18432 + 9216, k=3072, dtype=torch.bfloat16, device="cuda")
    got = fp8_gemv(*args)
    assert got.dtype == torch.bfloat16
    assert ((got.double().cpu() - want).abs() <= want.abs() * 2**-8 + 1e-2).all()  # BF16 rounding of the FP32 sum


@pytest.mark.cuda
@needs_fp8_gpu
def test_gemv_reads_weights_past_2_gib_on_the_gpu():
    """Kontext's fused modulation weight is 1.05 M rows x 3072 = 3.2 GB: byte offsets past int32."""
    from engines.fp8_gemv_triton import fp8_gemv

    n, k = 720_000, 3072
    g = torch.Generator(device="cuda").manual_seed(0)
    w8 = torch.randn(n, k, device="cuda", generator=g).to(torch.float8_e4m3fn)
    row_scales, bias = torch.full((n,), 0.01, device="cuda"), torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
    got = fp8_gemv(x, w8, row_scales, bias)[:, -1000:].double()
    want = (x.double() @ w8[-1000:].double().T) * 0.01
    assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-2).all()
