"""ComfyUI helpers for the scripts, tests and benchmarks: load this repository through ComfyUI's own
custom-node loader, and build ComfyUI's own Flux MODEL over a state dict."""
from __future__ import annotations

import asyncio
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LOADED: dict = {}


def load_pack_into_comfyui(tmp_path: Path) -> dict:
    """Load the pack under a pack-like folder name (a link in tmp_path); returns its node classes by id."""
    import nodes

    if _LOADED:
        return _LOADED
    link = Path(tmp_path) / "comfyui-kontext-trt"
    link.symlink_to(ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(link))):
        raise RuntimeError("ComfyUI refused to load the pack (its log says why)")
    _LOADED.update({k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before})
    return _LOADED


def comfy_flux_model(cfg, sd: dict, dtype, load_device=None):
    """ComfyUI's Flux MODEL (ModelPatcher over comfy.model_base.Flux) over `sd`, assigned, not copied.

    ComfyUI's checkpoint detection hardcodes Flux's full width, so the model is assembled from its
    supported-model class directly, the way comfy.sd does after detection.
    """
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(cfg.comfy_unet_config())
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device="meta")  # only the diffusion model's layers: nothing allocated twice
    # .to(dtype) shares tensors already in that dtype (a 24 GB BF16 model is never held twice) and casts others.
    model.diffusion_model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device or cpu, offload_device=cpu)
