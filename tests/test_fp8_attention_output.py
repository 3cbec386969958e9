"""Attention writing the FP8 inputs of the projections after it (FP8Attention.output_fp8): the kernel's scaled
output under Triton's CPU interpreter here and on the GPU when marked cuda, and the blocks' wiring (which
tokens go to which projection, at which scale) against the path with a 16-bit attention output."""
import pytest
import torch

from kernel_helpers import interpreted_kernel_module, needs_fp8_gpu
from test_fp8_attention import exact_attention, fp8_inputs, rel
from test_fp8_attention_inputs import HEAD_DIM, HEADS, make_streams, scales_for
from test_gelu_fp8 import fp8_linear, reference as gelu_reference

from engines import tiny_config
from engines.fp8 import FP8_MAX
from engines.fp8_attention import FP8Attention, quantize_transposed_for_kernel
from engines.transformer import EmbedND


@pytest.fixture
def interpreted():
    return interpreted_kernel_module("engines.fp8_attention_triton")


def scaled(x, scale):
    return (x / scale).clamp(-FP8_MAX, FP8_MAX)


@pytest.mark.parametrize("split", [37, 64, 200])  # a 64-row tile across the boundary, on it, one output
def test_kernel_writes_each_row_range_at_its_scale(interpreted, split):
    seq_len = 200
    q8, k8, v8, scales = fp8_inputs(2, 3, seq_len, 32, seed=split)
    vt8 = quantize_transposed_for_kernel(v8.float() * scales[2], scales[2])
    exact = exact_attention(q8, k8, v8, scales)
    out_scales = [torch.tensor([0.004]), torch.tensor([0.0005])]  # the second saturates some values at 448
    # The second output a column slice of a wider buffer, as linear2's input is: its other columns stay untouched.
    wide = torch.full((2, seq_len - split, 3, 40), float("nan"))
    outs = [torch.full((2, split, 3, 32), float("nan")), wide[..., 4:36]][: 1 if split == seq_len else 2]
    interpreted.fp8_attention_scaled_out(q8, k8, vt8, scales, outs, out_scales[:len(outs)],
                                         config=dict(BLOCK_M=64, BLOCK_N=64), quantize_p=False)
    want = [scaled(exact[:, :split], 0.004), scaled(exact[:, split:], 0.0005)]
    for got, w in zip(outs, want):
        assert not got.isnan().any()
        assert rel(got, w) < 1e-5
    if split < seq_len:
        assert (want[1].abs() == FP8_MAX).any()
        assert wide[..., :4].isnan().all() and wide[..., 36:].isnan().all()


def test_kernel_refuses_outputs_it_cannot_fill_by_name(interpreted):
    q8, k8, v8, scales = fp8_inputs(1, 2, 64, 32)
    vt8 = v8.transpose(-1, -2).contiguous()
    s = torch.tensor([0.01])
    with pytest.raises(ValueError, match=r"the outs' rows \[10, 50\] must add up to the 64 tokens"):
        interpreted.fp8_attention_scaled_out(q8, k8, vt8, scales,
                                             [torch.empty(1, 10, 2, 32), torch.empty(1, 50, 2, 32)], [s, s])
    with pytest.raises(ValueError, match=r"outs\[0\] must be \[1, rows, 2, 32\] with its last dimension contiguous, "
                                         r"got shape \(1, 64, 64\)"):
        interpreted.fp8_attention_scaled_out(q8, k8, vt8, scales, [torch.empty(1, 64, 64)], [s])
    with pytest.raises(ValueError, match=r"out_scales\[0\] must be float32 with one element, got torch.float16"):
        interpreted.fp8_attention_scaled_out(q8, k8, vt8, scales, [torch.empty(1, 64, 2, 32)], [s.half()])


@pytest.fixture
def kernels_on_the_cpu(monkeypatch, interpreted):
    """The backend's fused path, which runs where the Triton kernels do, taken here with the kernels under Triton's
    CPU interpreter (and FP8Linear.matmul_fp8's torch._scaled_mm, which PyTorch also runs on the CPU)."""
    import engines.fp8_attention
    import engines.fp8_gemv_triton
    import engines.gelu_fp8_triton
    import engines.runtime_torch

    for module in (engines.fp8_attention, engines.runtime_torch):
        monkeypatch.setattr(module, "triton_fp8_kernels_available", lambda device: True)
    # The interpreter cannot time configs: an autotuner given one runs it untimed.
    monkeypatch.setattr(interpreted.tuned_fp8_attention_kernel, "configs", interpreted.CONFIGS[3:4])  # 64 x 64
    monkeypatch.setattr(engines.fp8_gemv_triton.tuned_fp8_gemv_kernel, "configs", engines.fp8_gemv_triton.CONFIGS[:1])
    # The interpreter rounds some FP32 values that should round up into the next binade down to half (see
    # fp8_attention_triton.fp8_attention), ~1% of them: the kernels that write FP8 write FP32 here and PyTorch
    # rounds it, as the GPU's conversion does.
    scaled_out, gelu_fp8 = interpreted.fp8_attention_scaled_out, engines.gelu_fp8_triton.gelu_fp8

    def scaled_out_rounded(q8, k8, vt8, scales, outs, out_scales, **kw):
        unrounded = [torch.empty(o.shape) for o in outs]
        scaled_out(q8, k8, vt8, scales, unrounded, out_scales, **kw)
        for o, u in zip(outs, unrounded):
            o.copy_(u.to(o.dtype))

    def gelu_fp8_rounded(x, scale, prefix=None, out_dtype=torch.float8_e4m3fn, out=None):
        unrounded = gelu_fp8(x, scale, prefix, out_dtype=torch.float32)
        return unrounded.to(out_dtype) if out is None else out.copy_(unrounded.to(out.dtype))

    monkeypatch.setattr(interpreted, "fp8_attention_scaled_out", scaled_out_rounded)
    monkeypatch.setattr(engines.gelu_fp8_triton, "gelu_fp8", gelu_fp8_rounded)


# The FP8 of the FP32 output against the FP8 of its BF16 rounding (which the interpreter truncates toward zero):
# some values one FP8 step apart, measured 0.003-0.014. A projection given the other stream's rows or scale is
# off by far more (the two scales swapped: 0.91).
ROUNDING = 0.03


def test_double_block_projections_get_their_streams_fp8_at_their_scales(kernels_on_the_cpu):
    streams, pe = make_streams([24, 40], seed=4)
    attention = FP8Attention(*scales_for(streams, pe))
    g = torch.Generator().manual_seed(5)
    projections = [fp8_linear(g, HEADS * HEAD_DIM, 50, bias_dtype=torch.bfloat16) for _ in streams]
    amax = attention.attend(streams, pe).float().abs().amax()
    for p, factor in zip(projections, (1.0, 16.0)):  # 16x apart: either stream at the other's scale is far off
        p.input_scale = amax * factor / FP8_MAX
    want = attention.attend_projected(streams, pe, projections)
    attention.output_fp8 = True
    got = attention.attend_projected(streams, pe, projections)
    assert [t.shape for t in got] == [t.shape for t in want] == [(2, 24, 50), (2, 40, 50)]
    for gt, w in zip(got, want):
        assert gt.dtype == w.dtype == torch.bfloat16
        assert rel(gt, w) < ROUNDING


def test_single_block_linear2_gets_attention_and_gelu_in_one_fp8_input(kernels_on_the_cpu):
    from engines.runtime_torch import FP8SingleStreamBlock

    cfg = tiny_config()
    block = FP8SingleStreamBlock(cfg, dtype=torch.bfloat16)
    stream, pe, mlp = single_block_inputs(block, cfg, seq_len=45, seed=6)
    want = block.attend_projected(stream, pe, mlp)  # attention in 16 bits, then the GELU kernel with it as prefix
    block.attention.output_fp8 = True
    got = block.attend_projected(stream, pe, mlp)
    assert got.shape == want.shape == (2, 45, cfg.hidden_size) and got.dtype == torch.bfloat16
    assert rel(got, want) < ROUNDING


def single_block_inputs(block, cfg, seq_len, seed, device="cpu"):
    """Gives block an FP8Attention and an FP8 linear2 (input scale from GELU(MLP-in)'s range); -> (its stream,
    pe, the MLP part of linear1's output: a column slice, as the block has it)."""
    g = torch.Generator().manual_seed(seed)
    width = cfg.hidden_size
    linear1_out = (torch.randn(2, seq_len, 3 * width + cfg.mlp_hidden_dim, generator=g) * 3).to(device, torch.bfloat16)
    qkv, mlp = linear1_out.split([3 * width, cfg.mlp_hidden_dim], dim=-1)
    q, k, v = qkv.reshape(2, seq_len, 3, cfg.num_heads, -1).permute(2, 0, 3, 1, 4)
    stream = (q, k, v, block.norm.to(device))
    pe = EmbedND(cfg.theta, cfg.axes_dim)(torch.randint(0, 64, (1, seq_len, 3), generator=g).float()).to(device)
    block.attention = FP8Attention(*scales_for([stream], pe).to(device))
    block.linear2 = fp8_linear(g, width + cfg.mlp_hidden_dim, width, device=device, bias_dtype=torch.bfloat16)
    block.linear2.input_scale = gelu_reference(mlp.reshape(-1, mlp.shape[-1]), None, 1.0).abs().amax() / FP8_MAX
    return stream, pe, mlp


def test_output_fp8_falls_back_where_the_kernels_do_not_run():
    """On a CPU (no kernels) output_fp8 changes nothing: the attention's 16-bit output through the projections."""
    streams, pe = make_streams([24, 40], seed=8)
    attention = FP8Attention(*scales_for(streams, pe))
    g = torch.Generator().manual_seed(9)
    projections = [fp8_linear(g, HEADS * HEAD_DIM, 50, bias_dtype=torch.bfloat16) for _ in streams]
    want = attention.attend_projected(streams, pe, projections)
    attention.output_fp8 = True
    for gt, w in zip(attention.attend_projected(streams, pe, projections), want):
        assert torch.equal(gt, w)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("lengths", [[512, 8192], [1000]])
def test_gpu_kernel_writes_the_fp8_of_its_16_bit_output(lengths):
    from engines.fp8_attention_triton import fp8_attention, fp8_attention_scaled_out

    seq_len = sum(lengths)
    q8, k8, v8, scales = fp8_inputs(1, 24, seq_len, 128, device="cuda", seed=10)
    vt8 = v8.transpose(-1, -2).contiguous()
    bf16 = fp8_attention(q8, k8, vt8, scales, torch.bfloat16)
    out_scales = [bf16.float().abs().amax() * f / FP8_MAX for f in (1.0, 0.5)][:len(lengths)]
    outs = [torch.empty(1, n, 24, 128, device="cuda", dtype=torch.float8_e4m3fn) for n in lengths]
    fp8_attention_scaled_out(q8, k8, vt8, scales, outs, out_scales)
    parts = bf16.split(lengths, dim=1)
    for got, part, s in zip(outs, parts, out_scales):
        want = scaled(part.float(), s).to(torch.float8_e4m3fn).float()
        differ = got.float() != want
        # FP32 rounded once against rounded to BF16 first: rare one-step differences only
        assert differ.float().mean() < 0.02
        assert ((got.float() - want).abs()[differ] <= want.abs()[differ] * 0.125 + 2**-9).all()


@pytest.mark.cuda
@needs_fp8_gpu
def test_gpu_blocks_with_fp8_attention_output_compute_what_they_did():
    """A double block's projections and a single block's linear2 with output_fp8, eager and compiled, against the
    16-bit attention output path."""
    from engines.runtime_torch import FP8SingleStreamBlock

    streams, pe = make_streams([64, 1000], device="cuda", seed=11)
    attention = FP8Attention(*scales_for(streams, pe).cuda())
    g = torch.Generator().manual_seed(12)
    projections = [fp8_linear(g, HEADS * HEAD_DIM, 256, device="cuda", bias_dtype=torch.bfloat16) for _ in streams]
    for p in projections:
        p.input_scale = attention.attend(streams, pe).float().abs().amax() / FP8_MAX

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()

    with torch.no_grad():
        want = attention.attend_projected(streams, pe, projections)
        attention.output_fp8 = True
        for run in (attention.attend_projected, torch.compile(attention.attend_projected, fullgraph=True)):
            for got, w in zip(run(streams, pe, projections), want):
                assert got.shape == w.shape and cosine(got, w) > 0.9999

        cfg = tiny_config(num_heads=2, hidden_size=256, axes_dim=(16, 56, 56))  # 128-wide heads, as Kontext's
        block = FP8SingleStreamBlock(cfg, dtype=torch.bfloat16).cuda()
        stream, pe, mlp = single_block_inputs(block, cfg, seq_len=1000, seed=13, device="cuda")
        want = block.attend_projected(stream, pe, mlp)
        block.attention.output_fp8 = True
        for run in (block.attend_projected, torch.compile(block.attend_projected, fullgraph=True)):
            got = run(stream, pe, mlp)
            assert got.shape == want.shape and cosine(got, want) > 0.9999


def test_scaled_output_ops_compile(kernels_on_the_cpu):
    """torch.compile traces both new custom ops (their fake forms: a list of per-stream outputs, linear2's input)
    and gets what eager does, for two token counts: the second call recompiles with them symbolic, as Dynamo
    does when ComfyUI changes resolution."""
    from engines.runtime_torch import FP8SingleStreamBlock

    streams, pe = make_streams([24, 40], seed=13)
    attention = FP8Attention(*scales_for(streams, pe))
    attention.output_fp8 = True
    g = torch.Generator().manual_seed(14)
    projections = [fp8_linear(g, HEADS * HEAD_DIM, 50, bias_dtype=torch.bfloat16) for _ in streams]
    compiled = torch.compile(attention.attend_projected, fullgraph=True, backend="aot_eager")
    with torch.no_grad():  # as ComfyUI samples (the QK-norms' scales are parameters here)
        for streams, pe in ((streams, pe), make_streams([16, 52], seed=16)):
            want = attention.attend_projected(streams, pe, projections)
            for got, w in zip(compiled(streams, pe, projections), want):
                assert got.shape == w.shape and torch.equal(got, w)

        cfg = tiny_config()
        block = FP8SingleStreamBlock(cfg, dtype=torch.bfloat16)
        compiled = torch.compile(block.attend_projected, fullgraph=True, backend="aot_eager")
        for seq_len in (45, 61):
            stream, pe, mlp = single_block_inputs(block, cfg, seq_len=seq_len, seed=seq_len)
            block.attention.output_fp8 = True
            want = block.attend_projected(stream, pe, mlp)
            got = compiled(stream, pe, mlp)
            assert got.shape == want.shape and torch.equal(got, want)


@torch.no_grad()
def test_whole_backend_takes_the_fp8_output_path_in_every_block(kernels_on_the_cpu, tmp_path, monkeypatch):
    """The tiny calibrated FP8 backend as the loader builds it: with output_fp8 every block's attention writes its
    projections' FP8 inputs (none writes a 16-bit output), and the steps stay what they were up to this tiny
    random-weight model's sensitivity. (That is large: 0.9% noise added to one projection's output moves its step
    by 0.20, so the block-level tests above are where the numbers are checked; measured here 0.15.)"""
    pytest.importorskip("modelopt.torch.quantization")
    from test_runtime_torch import calibrate_tiny

    import engines.fp8_attention_triton as kernels
    from engines.accuracy import step_outputs
    from engines.runtime_torch import load_fp8_transformer

    _, sd, state, held = calibrate_tiny(tmp_path, attention=True)
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.bfloat16)
    attentions = [m for m in backend.modules() if isinstance(m, FP8Attention)]
    assert len(attentions) == 3  # one double block, two single blocks
    want = step_outputs(backend, held, (0.9,))
    calls = {"16-bit": 0, "scaled": []}
    sixteen_bit, scaled_out = kernels.fp8_attention, kernels.fp8_attention_scaled_out

    def count_16_bit(*args, **kw):
        calls["16-bit"] += 1
        return sixteen_bit(*args, **kw)

    def count_scaled(q8, k8, vt8, scales, outs, out_scales, **kw):
        calls["scaled"].append(len(outs))
        return scaled_out(q8, k8, vt8, scales, outs, out_scales, **kw)

    monkeypatch.setattr(kernels, "fp8_attention", count_16_bit)
    monkeypatch.setattr(kernels, "fp8_attention_scaled_out", count_scaled)
    for attention in attentions:
        attention.output_fp8 = True
    got = step_outputs(backend, held, (0.9,))
    assert calls == {"16-bit": 0, "scaled": [2, 1, 1]}  # the double block's two streams, then each single block
    for key in want:
        assert rel(got[key], want[key]) < 0.3, key
