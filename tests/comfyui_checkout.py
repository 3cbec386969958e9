"""Find and import a ComfyUI checkout for the integration tests, or say why not.

ComfyUI is not on PyPI and is never committed here: point COMFYUI_PATH at a checkout, or put this
pack in ComfyUI/custom_nodes/. Tests that need it skip with the reason below otherwise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_comfyui() -> tuple[Path | None, str]:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if (path / "comfy" / "model_management.py").is_file():
            return path, ""
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_management.py)"
    parent = ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy" / "model_management.py").is_file():
        return parent.parent, ""
    return None, "no ComfyUI checkout: set COMFYUI_PATH or place the pack in ComfyUI/custom_nodes/"


def import_comfyui() -> Path:
    """Put ComfyUI on sys.path (CPU mode when there is no CUDA) and return its root, or skip."""
    path, why = find_comfyui()
    if path is None:
        pytest.skip(why)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    return path


def tiny_comfy_kontext(cfg, sd, dtype=None):
    """A ComfyUI MODEL (ModelPatcher over comfy.model_base.Flux) of a tiny config, on the CPU.

    ComfyUI's checkpoint detection hardcodes Flux's full width, so a tiny model is assembled from
    its supported-model class directly, the way comfy.sd does after detection.
    """
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(
        image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=cfg.vec_in_dim,
        context_in_dim=cfg.context_in_dim, hidden_size=cfg.hidden_size, mlp_ratio=cfg.mlp_ratio,
        num_heads=cfg.num_heads, depth=cfg.depth, depth_single_blocks=cfg.depth_single_blocks,
        axes_dim=list(cfg.axes_dim), theta=cfg.theta, qkv_bias=cfg.qkv_bias, guidance_embed=cfg.guidance_embed)
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(dtype or torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model.load_state_dict(sd, strict=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


_LOADED = {}


def load_pack_into_comfyui(tmp_path):
    """Load this repository through ComfyUI's own custom-node loader, under a pack-like folder name (once)."""
    import asyncio
    import nodes

    if _LOADED:
        return _LOADED

    link = tmp_path / "comfyui-kontext-trt"
    link.symlink_to(ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(str(link))), "ComfyUI refused to load the pack"
    _LOADED.update({k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before})
    return _LOADED
