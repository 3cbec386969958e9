"""A tiny random-weight Kontext for running the shipped workflows on a CPU with no weights present.

MODEL is ComfyUI's own Flux (model_base.Flux + ModelPatcher) at a tiny width, so sampling, reference
latents and the edit nodes run as they do on the real model. CLIP and VAE are stand-ins with FLUX's
interfaces (16 latent channels, 8x downsampling, pooled + sequence text states): a tiny T5-XXL or
FLUX VAE cannot be built without weights. Images and text are therefore not meaningful; the path is.
Needs ComfyUI importable (COMFYUI_PATH on sys.path) and the repository root on sys.path.
"""
from __future__ import annotations

import torch

from engines import random_state_dict, tiny_config

CFG = tiny_config()


def tiny_comfy_kontext(cfg=CFG, sd=None, dtype=None):
    """ComfyUI's Flux MODEL of a tiny config, on the CPU (random weights unless `sd` is given)."""
    from comfyui_pack import comfy_flux_model

    return comfy_flux_model(cfg, random_state_dict(cfg, seed=11) if sd is None else sd, dtype or torch.float32)


class StandInClip:
    """FLUX text-encoder interface: tokenize + encode_from_tokens_scheduled, states seeded by the text, as wide as
    cfg's text inputs (a full-width Kontext: T5-XXL's 4096, CLIP-L's pooled 768)."""

    def __init__(self, on_tokenize=None, cfg=CFG):
        self.on_tokenize, self.cfg = on_tokenize, cfg

    def tokenize(self, text):
        if self.on_tokenize:
            self.on_tokenize(text)
        return {"prompt": text}

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens["prompt"])))
        return [[torch.randn(1, 8, self.cfg.context_in_dim, generator=g),
                 {"pooled_output": torch.randn(1, self.cfg.vec_in_dim, generator=g)}]]


class StandInVae:
    """FLUX VAE interface: 16 latent channels, 8x down/up-sampling (average colour in, colour out)."""

    latent_channels = 16

    def encode(self, pixels):  # [1, H, W, 3] in 0..1 -> [1, 16, H/8, W/8]
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1), 8)
        return torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1

    def decode(self, latent):  # -> [1, H, W, 3]
        return torch.nn.functional.interpolate((latent[:, :3] + 1) / 2, scale_factor=8).clamp(0, 1).movedim(1, -1)


def tiny_lora(cfg=CFG, seed=1, rank=8, alpha=4.0, magnitude=0.35) -> dict:
    """A random LoRA file's tensors in kohya / sd-scripts keys (lora_unet_<BFL name with underscores>.lora_down /
    lora_up / alpha) on every Linear of a Kontext of `cfg`, the embedders and final layer included, each product
    about `magnitude` times a random-init weight's norm."""
    from engines import KontextTransformer

    with torch.device("meta"):
        layers = {n: m.weight.shape for n, m in KontextTransformer(cfg).named_modules() if isinstance(m, torch.nn.Linear)}
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, (out_features, in_features) in layers.items():
        up, down = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
        up = up * (magnitude * out_features ** 0.5 / (up @ down).norm())  # a N(0, 1/in) weight's norm: sqrt(out)
        key = "lora_unet_" + name.replace(".", "_")
        sd.update({f"{key}.lora_up.weight": up * rank / alpha, f"{key}.lora_down.weight": down,
                   f"{key}.alpha": torch.tensor(alpha)})
    return sd


class TinyKontextLora:
    """LoraLoaderModelOnly's stand-in for the tiny Kontext: a random LoRA (tiny_lora) applied through ComfyUI's own
    LoRA loading (comfy.sd.load_lora_for_models) at the workflow's strength."""
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0})}}

    def load(self, model, strength_model):
        import comfy.sd

        return (comfy.sd.load_lora_for_models(model, None, tiny_lora(), strength_model, 0)[0],)


def demo_image(width: int = 80, height: int = 64) -> torch.Tensor:
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(3))


def _loader(return_type, make):
    class Loader:
        RETURN_TYPES = (return_type,) if return_type != "IMAGE" else ("IMAGE", "MASK")
        FUNCTION = "load"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            out = make()
            return (out, torch.zeros(out.shape[:3])) if return_type == "IMAGE" else (out,)

    Loader.__name__ = f"Tiny{return_type.title()}"
    return Loader


# The loaders of the shipped workflows and their tiny stand-ins (same output types and slots).
TINY_LOADERS = {
    "UNETLoader": ("TinyKontextModel", _loader("MODEL", tiny_comfy_kontext)),
    "KontextTRT_LoadQuantized": ("TinyKontextModel", _loader("MODEL", tiny_comfy_kontext)),
    "DualCLIPLoader": ("TinyFluxClip", _loader("CLIP", StandInClip)),
    "VAELoader": ("TinyFluxVae", _loader("VAE", StandInVae)),
    "LoadImage": ("TinyDemoImage", _loader("IMAGE", demo_image)),
}


def stand_in_encoders(cfg, vae=StandInVae) -> dict:
    """Stand-ins for the text-encoder and VAE loaders that fit a Kontext of config cfg (same output types and slots)."""
    return {"DualCLIPLoader": (f"StandInFluxClip{cfg.context_in_dim}x{cfg.vec_in_dim}",
                               _loader("CLIP", lambda: StandInClip(cfg=cfg))),
            "VAELoader": (f"StandIn{vae.__name__}", _loader("VAE", vae))}
