"""The fused GELU + FP8 quantization of the MLPs' hidden activations (gelu_fp8_triton.py): the kernel under
Triton's CPU interpreter here and on the GPU when marked cuda, against the PyTorch form it replaces
(SigmoidGELU as compiled, torch.cat, FP8Linear's input quantization)."""
import pytest
import torch

from kernel_helpers import interpreted_kernel_module, needs_fp8_gpu

from engines.fp8 import FP8_MAX, quantize_fp8
from engines.runtime_torch import gelu_tanh_as_sigmoid


def activations(rows=37, n_prefix=64, n_hidden=256, device="cpu", seed=0):
    """(x: the MLP part of a wider projection, a column slice as a single block's linear1 output is; prefix)."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(rows, 3 * n_prefix + n_hidden, generator=g) * 3).to(device, torch.bfloat16)
    prefix = (torch.randn(rows, n_prefix, generator=g) * 3).to(device, torch.bfloat16) if n_prefix else None
    return wide[:, 3 * n_prefix:], prefix


def reference(x, prefix, scale):
    """[prefix | GELU(x)] on FP8's scaled range, FP32 and unrounded (GELU in FP32, as the compiled blocks have it)."""
    parts = ([prefix.float()] if prefix is not None else []) + [gelu_tanh_as_sigmoid(x.float())]
    return (torch.cat(parts, dim=1) / scale).clamp(-FP8_MAX, FP8_MAX)


def fp8_linear(g, n_in, n_out, device="cpu", bias_dtype=torch.float32):
    """An FP8Linear with random weights and bias, its input scale fixed at 4 / 448."""
    from engines.runtime_torch import FP8Linear

    w = torch.randn(n_out, n_in, generator=g)
    s = w.abs().max() / FP8_MAX
    return FP8Linear(quantize_fp8(w, s), s, torch.randn(n_out, generator=g).to(bias_dtype),
                     torch.tensor(4.0 / FP8_MAX)).to(device)


@pytest.fixture
def interpreted():
    return interpreted_kernel_module("engines.gelu_fp8_triton")


@pytest.mark.parametrize("n_prefix", [64, 0])
def test_kernel_is_the_concatenated_gelu_on_fp8s_range(interpreted, n_prefix):
    x, prefix = activations(n_prefix=n_prefix)
    scale = torch.tensor([0.02])  # |GELU| up to ~12 -> ~600: some values saturate at 448
    got = interpreted.gelu_fp8(x, scale, prefix, out_dtype=torch.float32)
    want = reference(x, prefix, scale)
    assert got.shape == (37, n_prefix + 256) and (want.abs() == FP8_MAX).any()
    if prefix is not None:
        assert torch.equal(got[:, :n_prefix], want[:, :n_prefix])  # the prefix is copied, only scaled
    assert ((got - want).abs() <= want.abs() * 1e-5 + 1e-5).all()


def test_kernel_refuses_inputs_it_cannot_read_by_name(interpreted):
    x, prefix = activations()
    scale = torch.tensor([0.02])
    with pytest.raises(ValueError, match=r"gelu_fp8: x must be \[37, 256\] with its last dimension contiguous"):
        interpreted.gelu_fp8(x.t().contiguous().t(), scale, prefix)
    with pytest.raises(ValueError, match=r"gelu_fp8: prefix must be \[37, 64\] with its last dimension contiguous, "
                                         r"got shape \(36, 64\)"):
        interpreted.gelu_fp8(x, scale, prefix[:36])
    with pytest.raises(ValueError, match=r"gelu_fp8: x must be \[2, 256\] with its last dimension contiguous, got "
                                         r"shape \(2, 37, 256\)"):
        interpreted.gelu_fp8(x.unsqueeze(0).expand(2, -1, -1), scale, None)
    with pytest.raises(ValueError, match=r"gelu_fp8: scale must be float32 with one element, got torch.float16"):
        interpreted.gelu_fp8(x, scale.half(), prefix)
    x, prefix = activations(n_prefix=24)
    with pytest.raises(ValueError, match="gelu_fp8: widths 24 and 256 share no power-of-two tile of >= 16 columns"):
        interpreted.gelu_fp8(x, scale, prefix)


def test_backend_mlps_fall_back_to_the_modules_they_replace_off_the_gpu():
    """Where the kernel does not run (here: a CPU), FP8GELUMLP and FP8SingleStreamBlock compute exactly what the
    Sequential and SingleStreamBlock do."""
    from engines.runtime_torch import FP8GELUMLP, FP8SingleStreamBlock, SigmoidGELU
    from engines.transformer import SingleStreamBlock
    from engines import tiny_config

    g = torch.Generator().manual_seed(3)
    mlp = torch.nn.Sequential(fp8_linear(g, 128, 512), SigmoidGELU(), fp8_linear(g, 512, 128))
    x = torch.randn(2, 9, 128, generator=g)
    assert torch.equal(FP8GELUMLP(*mlp)(x), mlp(x))

    block = SingleStreamBlock(tiny_config())
    block.linear2 = fp8_linear(g, 128 + 512, 128)
    attn, hidden = torch.randn(2, 9, 128, generator=g), torch.randn(2, 9, 512, generator=g)
    want = block.output_projection(attn, hidden)
    block.__class__ = FP8SingleStreamBlock
    assert torch.equal(block.output_projection(attn, hidden), want)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("rows, n_prefix, n_hidden", [(1000, 3072, 12288), (300, 0, 12288), (77, 128, 512)])
def test_gpu_kernel_writes_the_fp8_of_the_pytorch_form(rows, n_prefix, n_hidden):
    from engines.gelu_fp8_triton import gelu_fp8

    x, prefix = activations(rows, n_prefix, n_hidden, device="cuda", seed=1)
    scale = torch.tensor([0.02], device="cuda")
    got = gelu_fp8(x, scale, prefix).float()
    want = reference(x, prefix, scale).to(torch.float8_e4m3fn).float()
    assert got.shape == (rows, n_prefix + n_hidden)
    differ = got != want
    # The GPU's exponential and division are not PyTorch's to the last bit: a value on an FP8 rounding boundary
    # may land one FP8 step away (none did on the H100 at full size against Inductor's kernel).
    assert differ.float().mean() < 1e-4
    assert ((got - want).abs()[differ] <= want.abs()[differ] * 0.125 + 2**-9).all()


@pytest.mark.cuda
@needs_fp8_gpu
def test_gpu_fused_mlps_compute_what_the_unfused_ones_do():
    from engines.runtime_torch import FP8GELUMLP, FP8SingleStreamBlock, SigmoidGELU, runs_fused_gelu
    from engines.transformer import SingleStreamBlock
    from engines import tiny_config

    g = torch.Generator().manual_seed(4)
    cuda_linear = dict(device="cuda", bias_dtype=torch.bfloat16)
    mlp = FP8GELUMLP(fp8_linear(g, 128, 512, **cuda_linear), SigmoidGELU(), fp8_linear(g, 512, 128, **cuda_linear))
    x = torch.randn(2, 300, 128, generator=g).cuda().bfloat16()
    assert runs_fused_gelu(mlp[2], x, 0, 512)
    fused = mlp(x)
    mlp.fused_gelu = False
    unfused = torch.compile(mlp)(x)  # compiled: GELU in FP32, as the fused kernel has it
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 1e-2

    block = SingleStreamBlock(tiny_config())
    block.linear2 = fp8_linear(g, 128 + 512, 128, **cuda_linear)
    block.__class__ = FP8SingleStreamBlock
    attn = torch.randn(2, 300, 128, generator=g).cuda().bfloat16()
    hidden = torch.randn(2, 300, 512, generator=g).cuda().bfloat16()
    assert runs_fused_gelu(block.linear2, attn, 128, 512)
    fused = block.output_projection(attn, hidden)
    block.fused_gelu = False
    unfused = torch.compile(block.output_projection)(attn, hidden)
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 1e-2
