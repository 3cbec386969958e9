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
    import utils.install_util  # noqa: F401  ComfyUI's `utils` package, bound before its nodes.py puts comfy/ (and
    # comfy/utils.py) first on sys.path, as its main.py does: its extra nodes import utils.install_util
    return path


def sample_full_width(model, seed=0):
    """Four euler steps of a 64x64 edit with a 64x64 reference latent through ComfyUI's own sampler, at CFG 1, with
    FLUX's text widths (T5 4096, CLIP-L pooled 768): what the one-block full-width tests compare."""
    import torch
    import comfy.sample

    g = torch.Generator().manual_seed(42)
    reference = torch.randn(1, 16, 8, 8, generator=g)
    cond = [[torch.randn(1, 16, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 2.5,
                                                     "reference_latents": [reference]}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 4, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                               disable_pbar=True)


sys.path.insert(0, str(ROOT / "scripts"))
from comfyui_pack import load_pack_into_comfyui  # noqa: E402,F401  (shared with the workflow runner)
from tiny_kontext import tiny_comfy_kontext  # noqa: E402,F401
from comfyui_pack import flux_unet_config  # noqa: E402,F401
