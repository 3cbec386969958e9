"""The pack's Triton kernels as PyTorch custom ops (`torch.ops.kontext_trt.*`), so torch.compile calls them
as opaque ops, their launch (autotuned, or with one given config), and the check of whether this device
can run them."""
from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import torch

from .fp8 import fp8_tensor_cores


@functools.cache
def triton_fp8_kernels_available(device: torch.device) -> bool:
    """FP8 tensor cores (compute capability >= 8.9) and an importable Triton."""
    if not fp8_tensor_cores(device):
        return False
    try:
        import triton  # noqa: F401
    except ImportError as e:
        logging.warning("Kontext TRT: Triton is not importable (%s): FP8 attention and the modulation GEMV run "
                        "unfused in PyTorch, with the same numbers and much slower", e)
        return False
    return True


def custom_op(name: str, fn: Callable, fake: Callable):
    """torch.ops.kontext_trt.<name> running fn (fake: its output's shape and dtype), registered once per
    process: the pack can be imported under two package names."""
    try:
        return getattr(torch.ops.kontext_trt, name)
    except AttributeError:
        pass
    op = torch.library.custom_op(f"kontext_trt::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    return getattr(torch.ops.kontext_trt, name)


def launch(kernel, tuned_kernel, grid: Callable[[dict], tuple], args: tuple, config: dict | None, **flags) -> None:
    """tuned_kernel (kernel under triton.autotune) when config is None, else kernel with config's tile sizes,
    num_warps and num_stages. grid(meta) -> the launch grid from the tile sizes."""
    if config is None:
        tuned_kernel[grid](*args, **flags)
    else:
        kernel[grid(config)](*args, **flags, **config)


# The pack's autotuned kernels: (name, module in this package, its triton.autotune object).
AUTOTUNED_KERNELS = (("fp8_attention", "fp8_attention_triton", "tuned_fp8_attention_kernel"),
                     ("fp8_gemv", "fp8_gemv_triton", "tuned_fp8_gemv_kernel"))


def autotuned_choices() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel picked in this process, per autotuning key (kernel -> {key: config});
    kernels not imported or not yet called are absent. For the benchmarks: when two configs time within noise,
    the autotuner's first-call pick can differ between runs or processes, and the kernel's speed with it."""
    choices = {}
    for name, module_name, attr in AUTOTUNED_KERNELS:
        tuner = getattr(sys.modules.get(f"{__package__}.{module_name}"), attr, None)
        if tuner is not None and tuner.cache:
            choices[name] = {str(key): str(config) for key, config in tuner.cache.items()}
    return choices
