"""ComfyUI entry point for Kontext TRT: registers the pack's nodes (V3 node API) and nothing else."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
