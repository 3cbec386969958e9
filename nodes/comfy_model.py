"""Reaching into a ComfyUI MODEL (a ModelPatcher) for the transformer, with a clear error otherwise."""
from ..engines import NotKontextError


def diffusion_model_state_dict(model) -> dict:
    """The transformer's state dict (BFL keys, ComfyUI's own tensors, no copy)."""
    inner = getattr(model, "model", None)
    diffusion_model = getattr(inner, "diffusion_model", None)
    if diffusion_model is None:
        raise NotKontextError(
            f"model: expected a ComfyUI MODEL holding a Flux/Kontext diffusion model, got {type(model).__name__}"
            f"{' wrapping ' + type(inner).__name__ if inner is not None else ''}")
    return diffusion_model.state_dict()
