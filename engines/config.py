"""The shape of a Kontext (Flux) transformer, and how to read it off a checkpoint.

FLUX.1 Kontext [dev] has the same architecture as FLUX.1 [dev]; what makes an edit an edit is
the reference tokens appended to the image sequence, which the transformer sees only as more
tokens with other position ids. So one config describes both, and tests use tiny ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KontextConfig:
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"KontextConfig: hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"KontextConfig: axes_dim {list(self.axes_dim)} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"KontextConfig: every axes_dim entry must be even, got {list(self.axes_dim)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    def comfy_unet_config(self, params_fields=()) -> dict:
        """ComfyUI's unet_config for this transformer (comfy.supported_models.Flux, or comfy.ldm.flux.model.Flux's
        keyword arguments). ComfyUI counts latent channels before its 2x2 patchify: 16, not 64.

        params_fields: the field names of the running ComfyUI's FluxParams. Newer ComfyUI adds required fields
        (0.8.0: txt_ids_dims, shared with Flux 2) that older ones refuse as unknown keywords; each one named
        here is given the value ComfyUI's own checkpoint detection gives FLUX.1 (COMFY_FLUX1_FIELDS)."""
        extra = {k: v for k, v in COMFY_FLUX1_FIELDS.items() if k in set(params_fields)}
        return dict(extra, image_model="flux", in_channels=self.in_channels // 4, out_channels=self.out_channels // 4,
                    patch_size=2, vec_in_dim=self.vec_in_dim, context_in_dim=self.context_in_dim,
                    hidden_size=self.hidden_size, mlp_ratio=self.mlp_ratio, num_heads=self.num_heads, depth=self.depth,
                    depth_single_blocks=self.depth_single_blocks, axes_dim=list(self.axes_dim), theta=self.theta,
                    qkv_bias=self.qkv_bias, guidance_embed=self.guidance_embed)

    @classmethod
    def from_dict(cls, d: dict) -> "KontextConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"KontextConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        d = dict(d)
        if "axes_dim" in d:
            d["axes_dim"] = tuple(d["axes_dim"])
        return cls(**d)


# FluxParams fields that not every ComfyUI has, with the values its model detection sets for FLUX.1
# (comfy/model_detection.py: txt_ids_dims [] — text tokens keep all-zero position ids).
COMFY_FLUX1_FIELDS = {"txt_ids_dims": []}

# FLUX.1 Kontext [dev], 11.9 B parameters.
KONTEXT_DEV = KontextConfig()


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (index, row, col) for a head dim, in released Flux's proportions: 128 -> 16, 56, 56."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    if head_dim % 16 or first + 2 * rest != head_dim or rest % 2:
        raise ValueError(f"head dim {head_dim}: expected a multiple of 16 so the RoPE axes split evenly")
    return first, rest, rest


def tiny_config(**overrides) -> KontextConfig:
    """A few-MB Kontext for tests and for the demo when no weights are present."""
    base = dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=128,
                mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 14, 14),
                theta=10_000, qkv_bias=True, guidance_embed=True)
    base.update(overrides)
    return KontextConfig(**base)
