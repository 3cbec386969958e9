"""The fused FP8 attention inputs (QK-norm + RoPE + FP8 quantization, V transposed): the Triton kernel under
Triton's CPU interpreter here and on the GPU when marked cuda, against the PyTorch form of
`transformer.Attention.attend` quantized as FP8Attention quantizes it."""
import pytest
import torch

from kernel_helpers import interpreted_kernel_module, needs_fp8_gpu

from engines.fp8 import FP8_MAX
from engines.fp8_attention import FP8Attention
from engines.transformer import EmbedND, QKNorm, apply_rope

HEADS, HEAD_DIM = 3, 32
AXES = (8, 12, 12)


def make_streams(lengths, batch=2, device="cpu", seed=0):
    """Streams as blocks make them: q, k, v views of one [B, L, 3 * H * D] projection, each with its own QKNorm
    (random scales), and pe over their tokens concatenated."""
    g = torch.Generator().manual_seed(seed)
    streams = []
    for length in lengths:
        qkv = torch.randn(batch, length, 3 * HEADS * HEAD_DIM, generator=g).mul(3).to(device, torch.bfloat16)
        q, k, v = qkv.view(batch, length, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        norm = QKNorm(HEAD_DIM, dtype=torch.bfloat16)
        for rms in (norm.query_norm, norm.key_norm):
            rms.scale.data = (torch.rand(HEAD_DIM, generator=g) + 0.5).to(torch.bfloat16)
        streams.append((q, k, v, norm.to(device)))
    ids = torch.randint(0, 64, (1, sum(lengths), 3), generator=g).float()
    pe = EmbedND(10_000, AXES)(ids).to(device)
    return streams, pe


def reference(streams, pe, scales):
    """Attention.attend's norm, concatenation and RoPE, then Q, K, V scaled onto FP8's range (FP32, unrounded)."""
    qs, ks, vs = zip(*[(*norm(q, k, v), v) for q, k, v, norm in streams])
    q, k, v = (torch.cat(ts, dim=2) for ts in (qs, ks, vs))
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return [(t.float() / s).clamp(-FP8_MAX, FP8_MAX) for t, s in zip((q, k, v), scales)]


def scales_for(streams, pe):
    q, k, v = (torch.cat([s[i].float() for s in streams], dim=2) for i in range(3))
    return torch.stack([(t.abs().max() * 1.1 / FP8_MAX) for t in (q.clamp(-4, 4), k.clamp(-4, 4), v)]).float()


def kernel_inputs(streams, pe, scales):
    return ([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
            [s[3].query_norm.scale for s in streams], [s[3].key_norm.scale for s in streams], pe, scales)


@pytest.fixture
def interpreted():
    return interpreted_kernel_module("engines.fp8_attention_inputs_triton")


# One stream (a single block); two ragged ones (a double block's text and image); heads in ragged groups of 2.
# V transposed (the Triton attention kernel's layout) or in rows like Q (FlashAttention-3's).
@pytest.mark.parametrize("transpose_v", [True, False])
@pytest.mark.parametrize("lengths", [[40], [20, 45]])
def test_kernel_is_norm_rope_and_scaling_of_the_pytorch_form(interpreted, lengths, transpose_v):
    streams, pe = make_streams(lengths)
    q0, k0, v0, norm0 = streams[0]
    streams[0] = (q0, k0.contiguous(), v0, norm0)  # strides need not match across q, k and v
    scales = scales_for(streams, pe)
    q, k, vt = interpreted.fp8_attention_inputs(*kernel_inputs(streams, pe, scales),
                                                qk_config=dict(BLOCK_L=16, HEADS_PER_PROGRAM=2),
                                                v_config=dict(BLOCK_L=32, HEADS_PER_PROGRAM=3), out_dtype=torch.float32,
                                                transpose_v=transpose_v)
    want_q, want_k, want_v = reference(streams, pe, scales)
    assert q.shape == k.shape == (2, HEADS, sum(lengths), HEAD_DIM)
    if transpose_v:
        assert vt.shape == (2, HEADS, HEAD_DIM, sum(lengths))
        assert vt.stride(-1) == 1 and vt.stride(-2) % 16 == 0  # each V^T row 16-byte aligned, as the attention wants
        assert torch.equal(vt, want_v.transpose(-1, -2))
    else:
        assert vt.shape == q.shape and vt.is_contiguous()
        assert torch.equal(vt, want_v)
    for got, want in ((q, want_q), (k, want_k)):
        # The interpreter rounds FP32 to bfloat16 toward zero (Triton 3.8), so both 16-bit roundings may differ by
        # a bfloat16 step (2^-8 of the values rounded, which RoPE's sums can cancel): the GPU test below checks
        # the FP8 values exactly. A wrong pair, rotation, norm, head or offset is off by the values themselves.
        row_max = want.abs().amax(-1, keepdim=True)
        assert ((got - want).abs() <= (want.abs() + row_max) * 2**-6).all()
        assert (got - want).abs().mean() < want.abs().mean() * 2**-6


def test_kernel_refuses_inputs_it_cannot_read_by_name(interpreted):
    streams, pe = make_streams([40])
    scales = scales_for(streams, pe)
    args = list(kernel_inputs(streams, pe, scales))
    args[5] = pe[:, :, :30]
    with pytest.raises(ValueError, match=r"pe has shape \(1, 1, 30, 16, 2, 2\), expected \(2 or 1, 1, 40, 16, 2, 2\)"):
        interpreted.fp8_attention_inputs(*args)
    args = list(kernel_inputs(streams, pe, scales))
    args[1] = [streams[0][1].transpose(-1, -2)]
    with pytest.raises(ValueError, match=r"stream 0's q, k, v must each be \[2, 3, L, 32\] with D contiguous"):
        interpreted.fp8_attention_inputs(*args)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("transpose_v", [True, False])
@pytest.mark.parametrize("lengths", [[300], [64, 1000]])
def test_gpu_kernel_writes_the_fp8_of_the_pytorch_form(lengths, transpose_v):
    from engines.fp8_attention_inputs_triton import fp8_attention_inputs

    streams, pe = make_streams(lengths, device="cuda", seed=1)
    scales = scales_for(streams, pe).cuda()
    got = fp8_attention_inputs(*kernel_inputs(streams, pe, scales), transpose_v=transpose_v)
    want = [t.to(torch.float8_e4m3fn) for t in reference(streams, pe, scales)]
    assert torch.equal(got[2].float(), (want[2].transpose(-1, -2) if transpose_v else want[2]).float())
    for g, w in zip(got[:2], want[:2]):
        differ = g.float() != w.float()
        assert differ.float().mean() < 1e-3
        # at most one FP8 step apart where they differ
        assert ((g.float() - w.float()).abs()[differ] <= w.float().abs()[differ] * 0.125 + 2**-9).all()


@pytest.mark.cuda
@needs_fp8_gpu
def test_gpu_fused_attend_matches_the_unfused_one():
    streams, pe = make_streams([64, 1000], device="cuda", seed=2)
    scales = scales_for(streams, pe).cuda()
    attention = FP8Attention(*scales)
    fused = attention.attend(streams, pe)
    attention.fused_inputs = False  # Attention.attend's PyTorch norm, concatenation and RoPE, then the same kernel
    unfused = attention.attend(streams, pe)
    assert fused.shape == unfused.shape == (2, 1064, HEADS * HEAD_DIM)
    cos = torch.nn.functional.cosine_similarity(fused.float().flatten(), unfused.float().flatten(), dim=0)
    assert cos > 0.9999
