"""The calibrated state of a quantized transformer, saved with safetensors and loaded again.

What calibration produced: every quantizer's buffers (amax, AWQ pre-quant scales, SVDQuant's
low-rank branches) and, for recipes that rewrite weights (SVDQuant), the rewritten weights. The
recipe and the model config travel in the file's metadata, so a build can be re-exported or
resumed without recalibrating, and a state is never loaded into a model of another shape.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomically
from .config import KontextConfig
from .recipes import parse_recipe
from .transformer import KontextTransformer

STATE_FORMAT = "kontext-trt-calibrated-state/1"
# Where an exported ComfyUI-native checkpoint (comfy_export.py) keeps the state in its header.
PACK_KEY = "kontext_trt"


class CalibratedStateError(ValueError):
    """A calibrated-state file that does not fit the model it is loaded into."""


def save_calibrated_state(model: KontextTransformer, recipe, path: str | Path) -> Path:
    from safetensors.torch import save_file

    from . import __version__

    sd = model.state_dict()
    tensors = {k: v for k, v in sd.items() if "_quantizer." in k}
    if recipe.rewrites_weights:
        quantized = {name for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and getattr(m, "weight_quantizer", None) is not None
                     and m.weight_quantizer.is_enabled}
        tensors.update({f"{name}.weight": sd[f"{name}.weight"] for name in quantized})
    if not tensors:
        raise CalibratedStateError("model: has no quantizer state to save; quantize it first")
    metadata = {"format": STATE_FORMAT, "recipe": recipe.to_json(), "recipe_source": recipe.source,
                "kontext_config": json.dumps(model.config.to_dict(), sort_keys=True), "pack_version": __version__}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_state_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise CalibratedStateError(f"{path}: not a Kontext TRT calibrated state (format {meta.get('format')!r})")
    return meta


def read_calibrated(path: str | Path) -> tuple:
    """(recipe, config, {quantizer key: amax tensor}) of a calibrated state file, or of an exported checkpoint whose
    header carries them (comfy_export.py)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if PACK_KEY in meta:
            pack = json.loads(meta[PACK_KEY])
            amax = {k: torch.tensor(v["value"], dtype=torch.float32).reshape(v["shape"]) for k, v in pack["amax"].items()}
            recipe_data, config, source = pack["recipe"], pack["kontext_config"], str(path)
        else:
            meta = read_state_metadata(path)
            amax = {k: f.get_tensor(k) for k in f.keys() if k.endswith("._amax")}
            recipe_data, config = json.loads(meta["recipe"]), json.loads(meta["kontext_config"])
            source = meta.get("recipe_source", str(path))
    recipe = parse_recipe(recipe_data, source=source, attention=recipe_data.get("attention") is not None)
    return recipe, KontextConfig.from_dict(config), amax


def load_calibrated_state(model: KontextTransformer, path: str | Path):
    """Quantize `model` per the saved recipe without calibrating, then load the saved state into it.

    Returns (recipe, report). Refuses a state saved from a model of another config.
    """
    from safetensors.torch import load_file

    from .quantize import check_report, quant_report, quantize_transformer

    meta = read_state_metadata(path)
    saved_config = KontextConfig.from_dict(json.loads(meta["kontext_config"]))
    if saved_config != model.config:
        raise CalibratedStateError(f"{path}: calibrated for a model of config {saved_config.to_dict()}, "
                                   f"not this one ({model.config.to_dict()})")
    recipe_data = json.loads(meta["recipe"])
    recipe = parse_recipe(recipe_data, source=meta.get("recipe_source", str(path)),
                          attention=recipe_data.get("attention") is not None)
    quantize_transformer(model, recipe, forward_loop=None)
    if recipe.algorithm["method"] == "svdquant":
        # ModelOpt swaps in its SVDQuant Linear (which adds the low-rank branch) only during its own
        # calibration; restoring without calibrating has to ask for the same swap.
        from modelopt.torch.quantization.model_calib import create_and_replace_svdquant_linear_on_the_fly

        create_and_replace_svdquant_linear_on_the_fly(model=model)
    device = next(model.parameters()).device
    for key, tensor in load_file(str(path), device=str(device)).items():
        _assign(model, key, tensor)
    report = quant_report(model)
    check_report(report, recipe, calibrated=True)
    return recipe, report


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_path, attr = key.rsplit(".", 1)
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise CalibratedStateError(f"calibrated state: {key} names no module of this model") from None
    if attr == "weight":
        module.weight = nn.Parameter(tensor.to(module.weight.dtype), requires_grad=False)
    elif attr in dict(module.named_buffers(recurse=False)):
        buffer = getattr(module, attr)
        buffer.data = tensor.to(buffer.dtype)
    elif attr.startswith("_") and hasattr(type(module), attr[1:]):
        setattr(module, attr[1:], tensor)  # ModelOpt registers these buffers through a property setter
    else:
        raise CalibratedStateError(f"calibrated state: {key} is not a quantizer buffer of this model")
