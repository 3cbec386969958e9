"""Flux's flow-matching schedule and an Euler edit trajectory at token level.

ComfyUI samples with its own samplers inside ComfyUI; this is for the places that run the
transformer alone: calibration (activations along the real trajectory), the demo and benchmarks.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def flux_sigmas(steps: int, n_image_tokens: int) -> Tensor:
    """BFL's `get_schedule`: linear 1 -> 0, time-shifted with mu linear in the image token count."""
    mu = 0.5 + (1.15 - 0.5) * (n_image_tokens - 256) / (4096 - 256)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t.clamp_min(1e-12) - 1))
    return torch.where(t > 0, shifted, t).float()


@torch.no_grad()
def euler_edit(model, txt: Tensor, txt_ids: Tensor, y: Tensor, reference: Tensor, img_ids: Tensor,
               n_target: int, steps: int, guidance: float, seed: int) -> Tensor:
    """Sample the target tokens of one edit from noise, the reference tokens alongside at every step.

    img_ids covers target then reference tokens; returns the target tokens [B, n_target, C].
    """
    batch = txt.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_target, reference.shape[-1], generator=g).to(reference.device, reference.dtype)
    sigmas = flux_sigmas(steps, n_target).to(reference.device)
    guidance_t = torch.full((batch,), guidance, device=reference.device)
    for i in range(steps):
        v = model(torch.cat([x, reference], dim=1), img_ids, txt, txt_ids, sigmas[i].expand(batch), y, guidance_t)
        x = x + (sigmas[i + 1] - sigmas[i]) * v[:, :n_target].to(x.dtype)
    return x
