"""Reaching into a ComfyUI MODEL (a ModelPatcher) for the transformer, with a clear error otherwise."""
import logging

import folder_paths

from ..engines import NotKontextError
from ..engines.source_weights import file_fingerprint, fp8_fingerprint, layout, open_checkpoint


def diffusion_model_state_dict(model) -> dict:
    """The transformer's state dict (BFL keys, ComfyUI's own tensors, no copy)."""
    inner = getattr(model, "model", None)
    diffusion_model = getattr(inner, "diffusion_model", None)
    if diffusion_model is None:
        raise NotKontextError(
            f"model: expected a ComfyUI MODEL holding a Flux/Kontext diffusion model, got {type(model).__name__}"
            f"{' wrapping ' + type(inner).__name__ if inner is not None else ''}")
    from .backend_model import BackendFlux

    if isinstance(diffusion_model, BackendFlux):
        raise NotKontextError("model: the quantized Kontext from Load Quantized Model; this node takes the original "
                              "model (Load Diffusion Model)")
    return diffusion_model.state_dict()


def model_source_file(weights, checkpoint: str) -> str | None:
    """The diffusion_models file holding exactly `weights` (a MODEL's SourceWeights): `checkpoint` checked (raises
    naming what differs), or with "auto" the files of the same layout fingerprinted until one matches; None when
    none does (a MODEL merged or patched in ComfyUI: its engine runs, the PyTorch backend will ask for a file)."""
    # An FP8 MODEL is matched by its FP8 layers (ComfyUI 0.3.64 rounds such a model's biases to FP8); the build
    # then reads the file itself, so the engine holds exactly the file's weights.
    fp8_only = bool(weights.fp8_layers)
    want = fp8_fingerprint(weights) if fp8_only else weights.fingerprint()
    names = folder_paths.get_filename_list("diffusion_models") if checkpoint == "auto" else [checkpoint]
    tried = []
    for name in names:
        path = folder_paths.get_full_path_or_raise("diffusion_models", name)
        try:
            with open_checkpoint(path, name) as candidate:
                if checkpoint == "auto" and layout(candidate) != layout(weights):
                    continue
        except (ValueError, OSError):
            if checkpoint != "auto":
                raise
            continue  # other models and files the pack cannot read: not the MODEL's file
        if file_fingerprint(path, fp8_only) == want:
            return name
        tried.append(name)
    if checkpoint != "auto":
        raise NotKontextError(f"checkpoint: {checkpoint}'s weights are not the MODEL's (fingerprints differ): pick the "
                              "file Load Diffusion Model loaded, with weight_dtype default and no LoRA applied")
    logging.warning("Kontext TRT: no file in models/diffusion_models holds the MODEL's weights (%s): the engine "
                    "records no source checkpoint, and its PyTorch backend needs a file with these weights",
                    "files of its layout: " + ", ".join(tried) if tried else "none has its layout")
    return None
