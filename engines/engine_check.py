"""The user-side engine check: a built engine against the PyTorch backend on this machine's GPU.

The same edit steps (the shipped default calibration set's images and prompts, encoded by StandInEncoder, at a
size the engine's first profile takes, one reference) run through the engine and through the reference, one after
the other so both never sit in GPU memory at once; the result is the cosine per sigma (worst pair) against the
recipe's tolerance (Recipe.min_cosine). The reference is the PyTorch backend (checkpoint + the calibrated state
beside the engine) for the fp8 recipe, the 16-bit transformer for recipes it does not run (NVFP4): the model the
recipe's tolerance is defined against. scripts/check_engine.py is the command.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .accuracy import ErrorRow, error_table, step_outputs
from .calibration import EncodedPair, default_encoded_pairs
from .config import KontextConfig
from .recipes import Recipe, parse_recipe
from .shape_profiles import ShapeProfile
from .tokens import PATCH, LATENT_DOWNSCALE

DEFAULT_SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.1)
STATE_SUFFIX = ".calibration.safetensors"  # beside the engine, as the build writes it


class EngineCheckError(RuntimeError):
    """The check cannot run (the engine, its sidecar, its calibrated state or the checkpoint do not fit)."""


@dataclass
class CheckResult:
    rows: list[ErrorRow]
    tolerance: float
    reference: str  # what the engine was compared with, for the report

    @property
    def passed(self) -> bool:
        return all(r.cosine_min >= self.tolerance for r in self.rows)


def engine_recipe(meta: dict) -> Recipe:
    recipe = meta["recipe"]
    return parse_recipe(recipe, source="engine sidecar", attention=recipe.get("attention") is not None)


def check_size(profile: ShapeProfile) -> int:
    """Pixels per side of a square target with one same-size reference that the profile takes (nearest its opt)."""
    cell = LATENT_DOWNSCALE * PATCH
    lo, opt, hi = profile.image_tokens
    side = max(1, round((opt / 2) ** 0.5))
    for candidate in sorted(range(1, 2 * side + 2), key=lambda s: abs(s - side)):
        if lo <= 2 * candidate * candidate <= hi:
            return candidate * cell
    raise EngineCheckError(f"engine profile {profile.name}: no square target with one same-size reference has "
                           f"{lo}..{hi} image tokens; this check sends target + one reference")


def check_pairs(config: KontextConfig, profile: ShapeProfile, n_pairs: int) -> list[EncodedPair]:
    size = check_size(profile)
    return default_encoded_pairs(config, size=size, n_txt=profile.text_tokens[1])[:n_pairs]


def compare(engine: torch.nn.Module, load_reference: Callable[[], torch.nn.Module], pairs: Sequence[EncodedPair],
            sigmas: Sequence[float], device, engine_dtype: torch.dtype, reference_dtype: torch.dtype,
            tolerance: float, reference: str) -> CheckResult:
    """Engine outputs first, the engine released, then the reference's (one model in GPU memory at a time)."""
    got = step_outputs(engine, pairs, sigmas, device=device, dtype=engine_dtype)
    release = getattr(engine, "release", None)
    if release is not None:
        release()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    want = step_outputs(load_reference(), pairs, sigmas, device=device, dtype=reference_dtype)
    return CheckResult(error_table(want, got), tolerance, reference)


def reference_loader(meta: dict, engine_path: Path, checkpoint: Path, device, dtype: torch.dtype
                     ) -> tuple[Callable[[], torch.nn.Module], str]:
    """(a function loading the reference, what it is). Fails here, before the engine runs: on a missing file, and
    on a checkpoint whose weights are not the ones the engine was built from (the comparison would say nothing)."""
    from .runtime_torch import load_fp8_transformer, runs_recipe
    from .source_weights import dequantize_fp8_weights, file_fingerprint, open_checkpoint, transformer_from_source

    if not checkpoint.is_file():
        raise EngineCheckError(f"checkpoint {checkpoint}: no such file (the Kontext checkpoint the engine was built "
                               "from)")
    built_from = meta.get("source", {}).get("name") or "its source"
    if "model_fingerprint" not in meta:
        raise EngineCheckError(f"engine {engine_path.name}: its sidecar records no fingerprint of the weights it was "
                               "built from (an older version of the pack built it): rebuild it")
    if file_fingerprint(checkpoint) != meta["model_fingerprint"]:
        raise EngineCheckError(f"checkpoint {checkpoint.name}: its weights are not those engine {engine_path.name} was "
                               f"built from ({built_from}); pass that checkpoint")
    recipe = engine_recipe(meta)
    if not runs_recipe(recipe):
        def load_16bit():
            with open_checkpoint(checkpoint) as weights:
                model = transformer_from_source(weights, dtype=dtype, device=device)
                dequantize_fp8_weights(model)
                return model.eval()

        return load_16bit, (f"the 16-bit model ({checkpoint.name}: the PyTorch backend runs the fp8 recipe, this "
                            f"engine is {recipe.name})")
    state = engine_path.with_name(engine_path.stem + STATE_SUFFIX)
    if not state.is_file():
        raise EngineCheckError(f"engine {engine_path.name}: its calibrated state {state.name} (the PyTorch backend's "
                               "scales) is not beside it; rebuild it with Build Engine")

    def load():
        with open_checkpoint(checkpoint) as weights:
            return load_fp8_transformer(weights, state, device=device, dtype=dtype)

    return load, f"the PyTorch backend ({checkpoint.name} + {state.name})"


def format_report(result: CheckResult, engine_name: str, recipe: Recipe, pairs: Sequence[EncodedPair]) -> str:
    rows, cols = pairs[0].reference_grid
    size = f"{cols * LATENT_DOWNSCALE * PATCH}x{rows * LATENT_DOWNSCALE * PATCH}"
    lines = [f"engine {engine_name} (recipe {recipe.name}{', FP8 attention' if recipe.attention else ''}) against "
             f"{result.reference}",
             f"{len(pairs)} edit pair(s) at {size} with a {size} reference and {pairs[0].txt.shape[1]} text tokens; "
             f"tolerance: cosine >= {result.tolerance} (the recipe's)",
             f"{'sigma':<8}{'cosine (worst pair)':<22}{'relative L2 (mean)':<21}"]
    for r in result.rows:
        lines.append(f"{r.sigma:<8.2f}{r.cosine_min:<22.5f}{r.rel_l2_mean:<21.4f}"
                     f"{'ok' if r.cosine_min >= result.tolerance else 'BELOW TOLERANCE'}")
    lines.append("PASS: the engine computes what the reference computes, within the recipe's tolerance" if result.passed
                 else "FAIL: the engine's output is farther from the reference than the recipe allows")
    return "\n".join(lines)


def read_sidecar(engine_path: Path) -> dict:
    from .engine_store import EngineStore

    if not engine_path.is_file():
        raise EngineCheckError(f"engine {engine_path}: no such file")
    return EngineStore(engine_path.parent).read_metadata(engine_path)
