"""The Kontext transformer at token level: the engine contract of DESIGN.md.

    img [B, N, in], img_ids [B, N, 3], txt [B, T, context], txt_ids [B, T, 3],
    timesteps [B] (sigma in 0..1), y [B, vec], guidance [B]  ->  [B, N, out]

The same cut as ComfyUI's `Flux.forward_orig` and BFL's TensorRT transformer: patchify, the
reference-latent packing and unpatchify stay with the caller. Module and parameter names are
BFL's, so a BFL or ComfyUI state dict loads by its own keys (see `state_dict.py`).

Written after BFL's reference `flux/modules/layers.py` and `flux/model.py`; the differences are
deliberate: attention is its own module (`Attention`) so a quantizer can wrap exactly the
QK^T / softmax / PV core, and the forward has no branch on tensor values, so it traces and
exports as one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import Tensor, nn

from .config import KontextConfig
from .contract import check_inputs

CUDA_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]


# ---------------------------------------------------------------- embeddings

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of a [B] float tensor, cos first (BFL's order), in float32."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [B, L, dim/2, 2, 2] for positions [B, L] on one axis, in float32."""
    # omega = theta^(-2i/dim); computed from a float32 arange so the exported graph holds no float64.
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.float()[..., None] * omega  # [B, L, dim/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


class EmbedND(nn.Module):
    """Multi-axis RoPE: ids [B, L, n_axes] -> pe [B, 1, L, head_dim/2, 2, 2]."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, H, L, D] by pe, in float32; returns x's dtype."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, dtype=None, device=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


# ---------------------------------------------------------------- attention

class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(x_dtype) * self.scale.to(x_dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class Attention(nn.Module):
    """softmax(Q K^T / sqrt(D)) V for q, k, v [B, H, L, D] (RoPE already applied) -> [B, L, H*D].

    Every block routes its attention core through one of these and nothing else, so the
    quantization recipes can replace exactly BMM1 (QK^T), softmax and BMM2 (P x V) here (forward).
    Blocks call `attend`, which also norms and rotates Q and K, so a runtime can fuse that with the
    quantization of the attention's inputs (the PyTorch backend's FP8 attention does).
    """

    def attend(self, streams: list[tuple[Tensor, Tensor, Tensor, QKNorm]], pe: Tensor) -> Tensor:
        """Joint attention over streams of (q, k, v [B, H, L_i, D], their QKNorm), their tokens concatenated
        in order; pe: RoPE over the whole sequence -> [B, sum L_i, H*D]."""
        qs, ks, vs = [], [], []
        for q, k, v, norm in streams:
            q, k = norm(q, k, v)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q, k, v = (ts[0] if len(ts) == 1 else torch.cat(ts, dim=2) for ts in (qs, ks, vs))
        return self(apply_rope(q, pe), apply_rope(k, pe), v)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.is_cuda:
            # PyTorch's default order tries flash first; on an H100 at 8704 tokens cuDNN's attention is ~2.2x
            # faster (measured: flash was 57% of a compiled FP8 step). ComfyUI sets the same priority.
            with sdpa_kernel(CUDA_SDPA_PRIORITY, set_priority=True):
                x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """The per-stream projections of a double block (BFL names: qkv, norm, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(dim // num_heads, dtype=dtype, device=device)
        self.proj = nn.Linear(dim, dim, dtype=dtype, device=device)

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, QKNorm]:
        """x [B, L, dim] -> q, k and v, each [B, H, L, D], and the QKNorm for q and k (one Attention.attend stream)."""
        qkv = self.qkv(x)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v, self.norm


# ---------------------------------------------------------------- blocks

class Modulation(nn.Module):
    """vec [B, dim] -> `multiplier` tensors [B, 1, dim]: (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool, dtype=None, device=None):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.split(self.lin(F.silu(vec)))

    def split(self, out: Tensor) -> tuple[Tensor, ...]:
        """lin's output [B, multiplier * dim], computed here or elsewhere -> the [B, 1, dim] tensors."""
        return out[:, None, :].chunk(self.multiplier, dim=-1)


def layer_norm(x: Tensor, dim: int) -> Tensor:
    # BFL's norms here have no affine parameters (elementwise_affine=False), hence no module. The width
    # is passed as an int: taken from x.shape it would be a traced value the ONNX exporter rejects.
    return F.layer_norm(x, (dim,), eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # Not torch.addcmul: its ONNX symbolic computes in float32, which would make the engine's output float32.
    return x * (1 + scale) + shift


class DoubleStreamBlock(nn.Module):
    """Image and text streams, each with its own weights, attending jointly (text first)."""

    def __init__(self, cfg: KontextConfig, dtype=None, device=None):
        super().__init__()
        hidden, mlp_hidden = cfg.hidden_size, cfg.mlp_hidden_dim
        kw = dict(dtype=dtype, device=device)
        self.hidden_size = hidden
        self.img_mod = Modulation(hidden, double=True, **kw)
        self.img_attn = SelfAttention(hidden, cfg.num_heads, cfg.qkv_bias, **kw)
        self.img_mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden, **kw), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden, **kw))
        self.txt_mod = Modulation(hidden, double=True, **kw)
        self.txt_attn = SelfAttention(hidden, cfg.num_heads, cfg.qkv_bias, **kw)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden, **kw), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden, **kw))
        self.attention = Attention()

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                mod: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """mod: img_mod's and txt_mod's linear outputs when computed outside (see KontextTransformer)."""
        img_mod = self.img_mod(vec) if mod is None else self.img_mod.split(mod[0])
        txt_mod = self.txt_mod(vec) if mod is None else self.txt_mod.split(mod[1])
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod

        img_stream = self.img_attn.split_heads(modulate(layer_norm(img, self.hidden_size), img_shift1, img_scale1))
        txt_stream = self.txt_attn.split_heads(modulate(layer_norm(txt, self.hidden_size), txt_shift1, txt_scale1))
        attn = self.attention.attend([txt_stream, img_stream], pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(layer_norm(img, self.hidden_size), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(layer_norm(txt, self.hidden_size), txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt, img]: qkv and MLP-in in one GEMM (linear1), attn-out and MLP-out in another (linear2)."""

    def __init__(self, cfg: KontextConfig, dtype=None, device=None):
        super().__init__()
        hidden, mlp_hidden = cfg.hidden_size, cfg.mlp_hidden_dim
        kw = dict(dtype=dtype, device=device)
        self.num_heads = cfg.num_heads
        self.hidden_size = hidden
        self.mlp_hidden_dim = mlp_hidden
        self.linear1 = nn.Linear(hidden, hidden * 3 + mlp_hidden, **kw)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden, **kw)
        self.norm = QKNorm(cfg.head_dim, **kw)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False, **kw)
        self.attention = Attention()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mod: Tensor | None = None) -> Tensor:
        """mod: the modulation's linear output when computed outside (see KontextTransformer)."""
        shift, scale, gate = self.modulation(vec) if mod is None else self.modulation.split(mod)
        qkv, mlp = torch.split(self.linear1(modulate(layer_norm(x, self.hidden_size), shift, scale)),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = self.attention.attend([(q, k, v, self.norm)], pe)
        return x + gate * self.output_projection(attn, mlp)

    def output_projection(self, attn: Tensor, mlp: Tensor) -> Tensor:
        """linear2 over [attention output, GELU(MLP-in)]. The FP8 backend runs it as one GELU + FP8 pass and
        the GEMM (runtime_torch.FP8SingleStreamBlock)."""
        return self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, dtype=None, device=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, out_channels, bias=True, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x, self.hidden_size), shift, scale))


# ---------------------------------------------------------------- the model

class KontextTransformer(nn.Module):
    def __init__(self, config: KontextConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        kw = dict(dtype=dtype, device=device)
        self.pe_embedder = EmbedND(config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, hidden, bias=True, **kw)
        self.time_in = MLPEmbedder(256, hidden, **kw)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden, **kw)
        self.guidance_in = MLPEmbedder(256, hidden, **kw) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, hidden, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config, **kw) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config, **kw) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(hidden, config.out_channels, **kw)
        # Every block's modulation depends on vec alone. A module set here computes all of their linear
        # outputs at once, vec [B, dim] -> one [B, n] per Modulation in block order (double blocks' img_mod,
        # txt_mod, then single blocks'): the PyTorch backend's one pass over the FP8 modulation weights.
        self.fused_modulation: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                timesteps: Tensor, y: Tensor, guidance: Tensor) -> Tensor:
        if not _is_tracing():
            check_inputs(self.config, img, img_ids, txt, txt_ids, timesteps, y, guidance)
        dtype = self.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        mods = self.fused_modulation(vec) if self.fused_modulation is not None else None
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe, None if mods is None else mods[2 * i: 2 * i + 2])

        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = block(x, vec, pe, None if mods is None else mods[2 * len(self.double_blocks) + i])
        return self.final_layer(x[:, txt.shape[1]:], vec)


def _is_tracing() -> bool:
    # Input checks compare shapes in Python; under export they would pin the dynamic axes.
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
