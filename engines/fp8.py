"""The FP8 E4M3 format at run time: what the PyTorch backend's GEMMs and attention share."""
from __future__ import annotations

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 tensor-core MMAs (torch._scaled_mm, Triton's FP8 dot): compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
