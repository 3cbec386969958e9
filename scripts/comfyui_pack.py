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


def flux_unet_config(cfg) -> dict:
    """cfg's unet_config for the running ComfyUI, whose FluxParams may require fields others lack (0.8.0)."""
    import dataclasses
    import comfy.ldm.flux.model

    return cfg.comfy_unet_config({f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)})


def comfy_flux_model(cfg, sd: dict, dtype, load_device=None, weight_dtype=None, fp8_optimizations: bool = False):
    """ComfyUI's Flux MODEL (ModelPatcher over comfy.model_base.Flux) over `sd`, assigned, not copied.

    ComfyUI's checkpoint detection hardcodes Flux's full width, so the model is assembled from its
    supported-model class directly, the way comfy.sd does after detection. weight_dtype (with dtype as
    the compute dtype) and fp8_optimizations are what its UNETLoader's weight_dtype option sets
    (fp8_e4m3fn_fast: torch.float8_e4m3fn + fp8_optimizations).
    """
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(flux_unet_config(cfg))
    model_config.set_inference_dtype(weight_dtype or dtype, dtype if weight_dtype is not None else None)
    if fp8_optimizations:
        model_config.optimizations["fp8"] = True
    model = model_config.get_model({}, device="meta")  # only the diffusion model's layers: nothing allocated twice
    # Each tensor in the dtype ComfyUI gave its parameter; .to() shares tensors already in that dtype (a 24 GB
    # BF16 model is never held twice) and casts others.
    want = {k: v.dtype for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict({k: v.to(want.get(k, dtype)) for k, v in sd.items()}, strict=True, assign=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device or cpu, offload_device=cpu)
