"""FP8 attention at run time: the fused Triton kernel (under Triton's CPU interpreter here, on the GPU
when marked cuda) and the recipe's PyTorch form, against attention computed exactly on the same FP8
inputs."""
import os

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import interpreted_kernel_module, needs_fp8_gpu

from engines.fp8 import FP8_MAX, quantize_fp8
from engines.fp8_attention import FP8Attention, fp8_attention_reference, quantize_transposed_for_kernel


def fp8_inputs(batch, heads, seq_len, head_dim, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scores with a real spread (not all ~0), as after QK-norm: some keys dominate each row.
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=g) * s for s in (2.0, 2.0, 1.0))
    scales = torch.stack([t.abs().max() / FP8_MAX for t in (q, k, v)]).float()
    q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), scales))
    return q8.to(device), k8.to(device), v8.to(device), scales.to(device)


def exact_attention(q8, k8, v8, scales):
    """float64 attention of the dequantized inputs -> [B, L, H, D]."""
    q, k, v = (t.double() * s.double() for t, s in zip((q8, k8, v8), scales.cpu()))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def triton_interpreter():
    return interpreted_kernel_module("engines.fp8_attention_triton")


# 50: one ragged block; 128: exactly two full blocks; 200: full blocks + a ragged one.
@pytest.mark.parametrize("seq_len", [50, 128, 200])
def test_kernel_is_exact_attention_apart_from_quantizing_p(triton_interpreter, seq_len):
    q8, k8, v8, scales = fp8_inputs(2, 3, seq_len, 32, seed=seq_len)
    vt8 = quantize_transposed_for_kernel(v8.float() * scales[2], scales[2])
    out = triton_interpreter.fp8_attention(q8, k8, vt8, scales, torch.float32,
                                           config=dict(BLOCK_M=64, BLOCK_N=64), quantize_p=False)
    assert out.shape == (2, seq_len, 3, 32)
    assert rel(out, exact_attention(q8, k8, v8, scales)) < 1e-5  # FP32 online softmax: rounding only


def test_kernel_takes_strided_q_and_k(triton_interpreter):
    q8, k8, v8, scales = fp8_inputs(1, 2, 96, 32, seed=1)
    # Q and K as views into [B, L, H, D] storage, as a fused producer may leave them.
    q_view = q8.transpose(1, 2).contiguous().transpose(1, 2)
    out = triton_interpreter.fp8_attention(q_view, k8, v8.transpose(-1, -2).contiguous(), scales, torch.float32,
                                           config=dict(BLOCK_M=64, BLOCK_N=64), quantize_p=False)
    assert rel(out, exact_attention(q8, k8, v8, scales)) < 1e-5


def test_kernel_refuses_wrong_inputs_by_name(triton_interpreter):
    q8, k8, v8, scales = fp8_inputs(1, 2, 64, 32)
    with pytest.raises(ValueError, match=r"vt8 has shape \(1, 2, 64, 32\), expected \(1, 2, 32, 64\)"):
        triton_interpreter.fp8_attention(q8, k8, v8, scales, torch.float32)
    with pytest.raises(ValueError, match="q8 must be float8_e4m3fn .* got torch.float32"):
        triton_interpreter.fp8_attention(q8.float(), k8, v8.transpose(-1, -2).contiguous(), scales, torch.float32)


@pytest.mark.parametrize("seq_len", [50, 64])
def test_v_goes_to_the_kernel_transposed_in_fp8_with_aligned_rows(seq_len):
    v = torch.randn(2, 3, seq_len, 32)
    scale = v.abs().max() / FP8_MAX
    vt8 = quantize_transposed_for_kernel(v, scale)
    assert vt8.shape == (2, 3, 32, seq_len) and vt8.dtype == torch.float8_e4m3fn
    assert vt8.stride(-1) == 1 and vt8.stride(-2) % 16 == 0  # each row 16-byte aligned
    assert torch.equal(vt8.float(), quantize_fp8(v, scale).transpose(-1, -2).float())


def test_recipe_form_differs_from_exact_only_by_p_quantization():
    q8, k8, v8, scales = fp8_inputs(1, 4, 300, 64)
    got = fp8_attention_reference(q8, k8, v8, scales, torch.float32)
    exact = exact_attention(q8, k8, v8, scales)
    err = rel(got, exact)
    # P on the FP8 grid (3 mantissa bits) is the recipe's only loss here: present, and small.
    assert 1e-4 < err < 0.05, err


def test_module_matches_the_recipe_and_keeps_the_attention_contract():
    q8, k8, v8, scales = fp8_inputs(2, 4, 80, 32)
    q, k, v = (t.float() * s for t, s in zip((q8, k8, v8), scales))
    module = FP8Attention(*scales)
    out = module(q, k, v)
    assert out.shape == (2, 80, 4 * 32)  # [B, L, H*D], as transformer.Attention returns
    want = fp8_attention_reference(q8, k8, v8, scales, torch.float32).flatten(2)
    assert rel(out, want) < 1e-6


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("seq_len", [1000, 2560])
def test_fused_kernel_on_the_gpu_computes_the_recipe(seq_len):
    assert os.environ.get("TRITON_INTERPRET", "0") == "0"
    from engines.fp8_attention_triton import fp8_attention

    q8, k8, v8, scales = fp8_inputs(2, 24, seq_len, 128, device="cuda")
    out = fp8_attention(q8, k8, v8.transpose(-1, -2).contiguous(), scales, torch.bfloat16)
    torch.cuda.synchronize()
    exact = exact_attention(q8.cpu(), k8.cpu(), v8.cpu(), scales.cpu())
    recipe = fp8_attention_reference(q8, k8, v8, scales, torch.float32).cpu()
    # The kernel quantizes the online softmax's unnormalized P (as TensorRT's fused FP8 attention does), the
    # recipe form the normalized P: the same grid, so errors of the same size, and close to each other.
    assert rel(out.cpu(), exact) < 1.5 * rel(recipe, exact) + 4e-3  # + the BF16 output's rounding
    assert rel(out.cpu(), recipe) < 0.05


@pytest.mark.cuda
@needs_fp8_gpu
def test_fused_kernel_sums_long_flat_attention_in_full_precision():
    """Uniform attention over 8704 keys: P = 1 everywhere, O = the mean of V. Hopper's FP8 MMA accumulates in
    reduced precision; summed over all keys in it, late blocks would be rounded away."""
    from engines.fp8_attention import quantize_transposed_for_kernel
    from engines.fp8_attention_triton import fp8_attention

    seq_len, scales = 8704, torch.tensor([1.0, 1.0, 1.0 / FP8_MAX], device="cuda")
    q8 = torch.zeros(1, 2, seq_len, 128, device="cuda").to(torch.float8_e4m3fn)
    k8 = torch.randn(1, 2, seq_len, 128, device="cuda").to(torch.float8_e4m3fn)
    v8 = (torch.rand(1, 2, seq_len, 128, device="cuda") * 224 + 224).to(torch.float8_e4m3fn)
    out = fp8_attention(q8, k8, quantize_transposed_for_kernel(v8.float(), scales[2] * FP8_MAX), scales,
                        torch.float32)
    want = (v8.float() / FP8_MAX).mean(dim=2, keepdim=True).transpose(1, 2).expand_as(out)
    assert rel(out, want) < 1e-3


def test_autotuned_choices_name_the_attention_kernels_pick(triton_interpreter):
    """kernel_ops.autotuned_choices (what the benchmarks record) reads the pick from the autotuner of the kernel
    module this package imported. The interpreter runs no autotuning, so the pick is put there as the autotuner
    would store it."""
    from engines.kernel_ops import autotuned_choices

    tuner = triton_interpreter.tuned_fp8_attention_kernel
    saved = dict(tuner.cache)
    tuner.cache.clear()
    try:
        assert "fp8_attention" not in autotuned_choices()
        tuner.cache[(8704, 128, True)] = triton_interpreter.CONFIGS[4]
        assert autotuned_choices()["fp8_attention"] == {"(8704, 128, True)": str(triton_interpreter.CONFIGS[4])}
        assert "BLOCK_M: 128" in str(triton_interpreter.CONFIGS[4])
    finally:
        tuner.cache.clear()
        tuner.cache.update(saved)
