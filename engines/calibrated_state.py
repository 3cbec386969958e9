"""The calibrated state of a quantized transformer, saved with safetensors and loaded again.

What calibration produced: every quantizer's buffers (amax, AWQ pre-quant scales, SVDQuant's
low-rank branches) and, for recipes that rewrite weights (SVDQuant), the rewritten weights. The
recipe and the model config travel in the file's metadata, so a build can be re-exported or
resumed without recalibrating, and a state is never loaded into a model of another shape.

Every reader goes through check_calibrated_state first: the file is a state of this pack, of the recipe
and config asked for, with an amax for every quantizer the recipe calibrates, each finite and positive.
A NaN amax gives NaN images, a zero one NaN (scale 0), a missing one a layer run in another precision
than the recipe says; each is refused naming the file, the quantizer and the value.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import write_atomically
from .config import KontextConfig
from .recipes import Recipe, RecipeError, parse_recipe
from .transformer import KontextTransformer

STATE_FORMAT = "kontext-trt-calibrated-state/1"
AMAX = "._amax"
# Where an exported ComfyUI-native checkpoint (comfy_export.py) keeps the state in its header.
PACK_KEY = "kontext_trt"


class CalibratedStateError(ValueError):
    """A calibrated-state file that is damaged, or does not fit the model or recipe it is loaded for."""


@dataclass(frozen=True)
class CheckedState:
    path: Path
    recipe: Recipe
    config: KontextConfig
    amax: dict[str, torch.Tensor]  # "<quantizer>._amax" -> its value, every one finite and positive


def save_calibrated_state(model: KontextTransformer, recipe, path: str | Path, tmp_dir: str | Path | None = None) -> Path:
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
    # What calibration measured is checked before it is kept: a state no reader would accept is not written.
    _check_values({k: v for k, v in tensors.items() if k.endswith(AMAX)}, f"calibration of {path}")
    metadata = {"format": STATE_FORMAT, "recipe": recipe.to_json(), "recipe_source": recipe.source,
                "kontext_config": json.dumps(model.config.to_dict(), sort_keys=True), "pack_version": __version__}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), tmp_dir=tmp_dir)


def _header(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CalibratedStateError(f"{path}: not a readable calibrated state ({e}); the file is damaged or cut "
                                   "short: delete it and build again (calibration runs again)") from None


def _state_metadata(path: Path, header: dict) -> dict:
    if header.get("format") != STATE_FORMAT:
        raise CalibratedStateError(f"{path}: not a Kontext TRT calibrated state (format {header.get('format')!r})")
    return header


def read_state_metadata(path: str | Path) -> dict:
    """The state file's metadata, refusing a file that is not a readable safetensors state of this pack."""
    return _state_metadata(Path(path), _header(Path(path)))


def check_calibrated_state(path: str | Path, recipe: Recipe | None = None,
                           config: KontextConfig | None = None) -> CheckedState:
    """Everything a reader needs from a state file (or an exported checkpoint whose header carries the state,
    comfy_export.py), checked: its recipe (equal to `recipe` when given), its model config (equal to `config` when
    given), and the amax of every quantizer that recipe calibrates, finite and positive. Reads only the quantizer
    buffers, never the weights a checkpoint or an SVDQuant state carries."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = _header(path)
    if PACK_KEY in header:
        try:
            pack = json.loads(header[PACK_KEY])
            recipe_data, config_data = pack["recipe"], pack["kontext_config"]
            amax = {k: torch.tensor(v["value"], dtype=torch.float32).reshape(v["shape"]) for k, v in pack["amax"].items()}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CalibratedStateError(f"{path}: its header's {PACK_KEY!r} entry (the calibrated state) is damaged "
                                       f"({type(e).__name__}: {e})") from None
        recipe_source = str(path)
    else:
        meta = _state_metadata(path, header)
        try:
            recipe_data = json.loads(meta["recipe"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CalibratedStateError(f"{path}: its metadata field 'recipe' is missing or not a recipe ({e})") from None
        try:
            config_data = json.loads(meta["kontext_config"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CalibratedStateError(f"{path}: its metadata field 'kontext_config' is missing or not a Kontext "
                                       f"config ({e})") from None
        recipe_source = meta.get("recipe_source", str(path))
        amax = None
    try:
        saved_recipe = parse_recipe(recipe_data, source=recipe_source, attention=recipe_data.get("attention") is not None)
    except (TypeError, AttributeError, RecipeError) as e:
        raise CalibratedStateError(f"{path}: its metadata field 'recipe' is missing or not a recipe ({e})") from None
    try:
        saved_config = KontextConfig.from_dict(config_data)
    except (TypeError, ValueError, AttributeError) as e:
        raise CalibratedStateError(f"{path}: its metadata field 'kontext_config' is not a Kontext config ({e})") from None
    if recipe is not None and saved_recipe.to_json() != recipe.to_json():
        raise CalibratedStateError(f"{path}: expected a state calibrated with {_describe(recipe)}, got one "
                                   f"calibrated with {_describe(saved_recipe)}")
    if config is not None and saved_config != config:
        raise CalibratedStateError(f"{path}: calibrated for a model of config {saved_config.to_dict()}, "
                                   f"not this one ({config.to_dict()})")
    with torch.device("meta"):
        expected = saved_recipe.calibrated_quantizers(KontextTransformer(saved_config))
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(amax) if amax is not None else set(f.keys())
            missing = [q for q in expected if q + AMAX not in keys]
            if missing:
                raise CalibratedStateError(
                    f"{path}: expected an amax for each of the {len(expected)} quantizers recipe {saved_recipe.name} "
                    f"calibrates, got none for {len(missing)}: {missing[:4]}{' ...' if len(missing) > 4 else ''}; the "
                    "file is incomplete: delete it and build again")
            if amax is None:
                amax = {k: f.get_tensor(k) for k in sorted(keys) if k.endswith(AMAX)}
    except SafetensorError as e:
        raise CalibratedStateError(f"{path}: a tensor cannot be read ({e}); the file is damaged: delete it and "
                                   "build again") from None
    _check_values(amax, str(path))
    return CheckedState(path, saved_recipe, saved_config, amax)


def read_calibrated(path: str | Path) -> tuple:
    """(recipe, config, {quantizer key: amax tensor}) of a calibrated state file, or of an exported checkpoint whose
    header carries them (comfy_export.py); checked as check_calibrated_state checks them."""
    state = check_calibrated_state(path)
    return state.recipe, state.config, state.amax


def _describe(recipe: Recipe) -> str:
    return f"recipe {recipe.name} with attention {'quantized' if recipe.attention else 'in 16-bit'}"


def _check_values(amax: dict[str, torch.Tensor], where: str) -> None:
    for key, value in amax.items():
        v = value.detach().float().flatten()
        bad = v[~(torch.isfinite(v) & (v > 0))]
        if v.numel() == 0 or bad.numel():
            got = "no value" if v.numel() == 0 else f"{bad[0].item()}"
            count = f" ({bad.numel()} of its {v.numel()} values)" if v.numel() > 1 else ""
            raise CalibratedStateError(f"{where}: quantizer {key[:-len(AMAX)]}: expected a finite, positive amax, "
                                       f"got {got}{count}")


def load_calibrated_state(model: KontextTransformer, path: str | Path, recipe: Recipe | None = None):
    """Quantize `model` per the saved recipe without calibrating, then load the saved state into it.

    Returns (recipe, report). The state is checked (check_calibrated_state) against `recipe` when given and
    against the model's config before the model is touched.
    """
    from safetensors.torch import load_file

    from .quantize import check_report, quant_report, quantize_transformer

    recipe = check_calibrated_state(path, recipe, model.config).recipe
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
