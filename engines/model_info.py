"""A short, human description of a Kontext transformer, for nodes and logs."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .state_dict import config_from_state_dict, strip_prefix


def describe_kontext_model(sd: Mapping[str, Tensor]) -> str:
    """One paragraph: architecture, size, weight dtypes. Raises NotKontextError for anything else."""
    sd = strip_prefix(sd)
    cfg = config_from_state_dict(sd)
    params = sum(t.numel() for t in sd.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    gib = sum(t.numel() * t.element_size() for t in sd.values()) / 2**30
    return (f"Flux/Kontext transformer: {cfg.depth} double + {cfg.depth_single_blocks} single blocks, "
            f"hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, text width {cfg.context_in_dim}, "
            f"guidance embed {'yes' if cfg.guidance_embed else 'no'}; {params / 1e9:.2f} B parameters, "
            f"{gib:.2f} GiB as {'/'.join(dtypes)}.")
