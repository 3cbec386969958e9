"""BFL / ComfyUI Kontext checkpoints: recognise them, read their config, load them without a copy."""
from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Mapping

import torch
from torch import Tensor

from .config import KontextConfig, default_axes_dim
from .transformer import KontextTransformer

# Prefixes under which the transformer's keys appear in the files people have: a full ComfyUI or
# BFL checkpoint ("model.diffusion_model."), or ComfyUI's diffusion model state dict as is.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")

# What every Flux-architecture transformer has; a file lacking these is something else.
REQUIRED_KEYS = (
    "img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
    "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.query_norm.scale",
    "single_blocks.0.linear1.weight", "final_layer.linear.weight",
)


class NotKontextError(ValueError):
    """A state dict that is not a Flux / Kontext transformer."""


def checkpoint_prefix(keys) -> str:
    """The prefix under which a checkpoint file's keys hold the transformer ('' for a bare one)."""
    keys = set(keys)
    for prefix in KNOWN_PREFIXES:
        if prefix + "img_in.weight" in keys:
            return prefix
    raise NotKontextError(f"checkpoint: no Flux/Kontext transformer in it (no 'img_in.weight' under "
                          f"{[p for p in KNOWN_PREFIXES if p]}); it has e.g. {sorted(keys)[:5]}")


def strip_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's own keys, without a checkpoint prefix; the tensors themselves are not touched."""
    for prefix in KNOWN_PREFIXES:
        if prefix + "img_in.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sample = sorted(sd)[:5]
    raise NotKontextError(
        "state dict: expected a Flux/Kontext transformer with key 'img_in.weight' (optionally under "
        f"{[p for p in KNOWN_PREFIXES if p]}), got {len(sd)} keys starting {sample}")


def read_checkpoint(path, dtype: torch.dtype, device="cpu") -> dict[str, Tensor]:
    """The transformer's tensors from a .safetensors checkpoint (BFL, ComfyUI or diffusion-model file), by
    their own keys, in `dtype` on `device`; other models in the file (VAE, text encoders) are not read."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint: expected a .safetensors file, got {str(path)!r} (no such file)")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        prefix = checkpoint_prefix(f.keys())
        return {k[len(prefix):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}


def _count_blocks(keys, kind: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{kind}\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise NotKontextError(f"state dict: {kind} indices are not contiguous from 0: {sorted(idx)}")
    return len(idx)


def config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, ...] | None = None) -> KontextConfig:
    """Read a Kontext config off a (prefix-stripped) state dict's shapes."""
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise NotKontextError(f"state dict: not a Flux/Kontext transformer, missing keys {missing}")
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if axes_dim is None:
        # RoPE axes are not stored in the weights; released Flux models use 16, 56, 56 for head dim 128.
        axes_dim = default_axes_dim(head_dim)
    return KontextConfig(
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(sd, "double_blocks"),
        depth_single_blocks=_count_blocks(sd, "single_blocks"),
        axes_dim=tuple(axes_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def transformer_from_state_dict(sd: Mapping[str, Tensor], config: KontextConfig | None = None) -> KontextTransformer:
    """A KontextTransformer whose parameters ARE the given tensors (no copy, no second allocation).

    The module is built on the meta device and the tensors are assigned in, so a 24 GB checkpoint
    already in memory (ComfyUI's) costs nothing more.
    """
    sd = strip_prefix(sd)
    config = config or config_from_state_dict(sd)
    with torch.device("meta"):
        model = KontextTransformer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise NotKontextError(
            f"state dict: does not match a Kontext transformer of config {config.to_dict()}: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) != 1:
        # Mixed dtypes would make the GEMMs' inputs disagree; ask for one rather than copy.
        raise NotKontextError(f"state dict: expected one floating dtype for all tensors, got {sorted(map(str, dtypes))}")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(model.state_dict()[name].shape):
            raise NotKontextError(
                f"state dict: {name} has shape {tuple(t.shape)}, expected {tuple(model.state_dict()[name].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_state_dict(config: KontextConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> dict[str, Tensor]:
    """Random BFL-keyed weights at the scale trained weights have (unit-ish activations).

    Linear weights ~ N(0, 1/fan_in) so each layer keeps activations O(1); RMSNorm scales near 1;
    biases small. Used by tests, the demo and the benchmarks when no checkpoint is given.
    """
    g = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in KontextTransformer(config).state_dict().items()}
    sd = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device)
        if name.endswith(".scale"):
            t = 1.0 + 0.1 * t
        elif name.endswith(".bias"):
            t = 0.02 * t
        else:
            t = t / shape[1] ** 0.5
        sd[name] = t.to(dtype)
    return sd
