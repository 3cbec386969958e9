"""ComfyUI entry point for Kontext TRT: registers the pack's nodes (V3 node API) and its frontend extension.

ComfyUI reads WEB_DIRECTORY from the pack's module before it looks for the V3 entry point (0.3.64 and 0.8.0
alike) and serves every .js file in it as a frontend extension: web/ holds the Kontext Edit chat panel.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"
__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
