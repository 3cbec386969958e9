"""Can this GPU and TensorRT flavour run what a recipe builds? Said before any work starts."""
from __future__ import annotations

from .recipes import Recipe


class UnsupportedTarget(RuntimeError):
    """The GPU or TensorRT flavour cannot run the engine the request would build."""


def check_build_target(recipe: Recipe, flavour: str, compute_capability: tuple[int, int] | None) -> None:
    if compute_capability is None:
        raise UnsupportedTarget("no CUDA GPU found: an engine is built for, and calibrated on, the NVIDIA GPU it will run on")
    cc = ".".join(map(str, compute_capability))
    need = recipe.min_compute_capability
    if compute_capability < need:
        raise UnsupportedTarget(f"recipe {recipe.name} needs compute capability >= {need[0]}.{need[1]} "
                                f"({'Ada, Hopper or Blackwell' if need < (10, 0) else 'Blackwell'}); this GPU is {cc}"
                                + ("; use the fp8 recipe" if recipe.name != "fp8" and compute_capability >= (8, 9) else ""))
    if "nvfp4" in recipe.gemm["weights"] and compute_capability[0] not in (10, 11, 12):
        raise UnsupportedTarget(f"recipe {recipe.name}: NVFP4 runs natively only on Blackwell (compute capability "
                                f"10.x / 12.x); this GPU is {cc}")
    if flavour == "tensorrt_rtx" and compute_capability == (9, 0):
        raise UnsupportedTarget("TensorRT-RTX's runtime does not run on compute capability 9.0 (H100 / H200); "
                                "install full TensorRT (`pip install tensorrt`) for this GPU")
