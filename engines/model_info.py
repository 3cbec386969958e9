"""A short, human description of a Kontext transformer, for nodes and logs."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .source_weights import FP8Weight, SourceWeights, from_state_dict
from .state_dict import config_from_state_dict


def describe_kontext_model(weights: SourceWeights | Mapping[str, Tensor]) -> str:
    """One paragraph: architecture, size, how the weights are stored (FP8 layers counted as their FP8 bytes and
    scales, not the dtype a QuantizedTensor reports). Raises NotKontextError for anything else."""
    if not isinstance(weights, SourceWeights):
        weights = from_state_dict(weights)
    shapes = weights.shapes()
    cfg = config_from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    params, size, dtypes = 0, 0, set()
    for key in weights.keys:
        t = weights.get(key)
        if isinstance(t, FP8Weight):
            params += t.data.numel()
            size += t.data.numel() * t.data.element_size() + 4
            dtypes.add("float8_e4m3fn (per-tensor scaled)")
        else:
            params += t.numel()
            size += t.numel() * t.element_size()
            dtypes.add(str(t.dtype).removeprefix("torch."))
    fp8 = len(weights.fp8_layers)
    return (f"Flux/Kontext transformer: {cfg.depth} double + {cfg.depth_single_blocks} single blocks, "
            f"hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, text width {cfg.context_in_dim}, "
            f"guidance embed {'yes' if cfg.guidance_embed else 'no'}; {params / 1e9:.2f} B parameters, "
            f"{_size(size)} as {' + '.join(sorted(dtypes))}; format {weights.format}"
            f"{f', {fp8} FP8 layers' if fp8 else ''}.")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
