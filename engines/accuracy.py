"""Per-step output error of a quantized transformer against its 16-bit self, over several sigmas.

One step as sampling sees it: the target tokens a mix of the reference (an edit keeps most of the
image) and noise at that sigma, the reference tokens alongside, the pair's text. Error is taken
on the target tokens' output, the part the sampler uses.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .calibration import EncodedPair
from .quantize import output_error
from .tokens import edit_ids


@dataclass
class ErrorRow:
    sigma: float
    cosine_min: float  # worst pair
    cosine_mean: float
    rel_l2_mean: float


def edit_step_inputs(pair: EncodedPair, sigma: float, seed: int, guidance: float = 2.5, device="cpu",
                     dtype=torch.float32) -> dict:
    grid = pair.reference_grid
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(pair.reference.shape, generator=g)
    target = (1 - sigma) * pair.reference + sigma * noise
    n_txt = pair.txt.shape[1]
    x = dict(img=torch.cat([target, pair.reference], dim=1), img_ids=edit_ids(grid, [grid])[None], txt=pair.txt,
             txt_ids=torch.zeros(1, n_txt, 3), timesteps=torch.tensor([sigma]), y=pair.y,
             guidance=torch.tensor([guidance]))
    floats = ("img", "txt", "y")
    return {k: v.to(device=device, dtype=dtype if k in floats else torch.float32) for k, v in x.items()}


@torch.no_grad()
def step_outputs(model, pairs: Sequence[EncodedPair], sigmas: Sequence[float], seed: int = 1234, device=None,
                 dtype: torch.dtype | None = None) -> dict:
    """{(pair index, sigma): target-token output in float32 on the CPU}. device and dtype: where and in what the
    inputs are made (default: the model's parameters' device and the model's dtype; a TensorRT backend has none)."""
    if device is None:
        device = next(model.parameters()).device
    out = {}
    for i, pair in enumerate(pairs):
        n_target = pair.reference.shape[1]
        for s in sigmas:
            x = edit_step_inputs(pair, s, seed + i, device=device, dtype=dtype or model.dtype)
            out[(i, s)] = model(**x)[:, :n_target].float().cpu()
    return out


def error_table(reference: dict, quantized: dict) -> list[ErrorRow]:
    rows = []
    for s in sorted({s for _, s in reference}, reverse=True):
        errs = [output_error(reference[k], quantized[k]) for k in reference if k[1] == s]
        cos = [c for c, _ in errs]
        rows.append(ErrorRow(sigma=s, cosine_min=min(cos), cosine_mean=sum(cos) / len(cos),
                             rel_l2_mean=sum(r for _, r in errs) / len(errs)))
    return rows
