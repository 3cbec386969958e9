"""The number formats a recipe may name, and the ModelOpt quantizer attributes each one means.

Recipes name formats ("fp8_per_tensor") rather than spelling out ModelOpt attributes, so a typo is
an unknown name with a clear error instead of a silently different quantizer.
"""
from __future__ import annotations

FP8_E4M3 = [4, 3]
NVFP4_E2M1 = [2, 1]

FORMATS: dict[str, dict] = {
    # FP8 E4M3 with one static scale per tensor, calibrated (max): the GEMM and attention format of the FP8 recipe.
    "fp8_per_tensor": {"num_bits": FP8_E4M3, "axis": None},
    # FP8 E4M3 with one static scale per output channel: for weight-only layers, where the scale is
    # applied when the weight is dequantized and no FP8 GEMM needs a single scale.
    "fp8_per_channel": {"num_bits": FP8_E4M3, "axis": 0},
    # FP8 E4M3 with a dynamic scale per 32 tokens (SageAttention-style) for Q and K: BMM1 stays an FP8
    # GEMM, and the per-token-block scales factor out of it because they lie along a non-contracted axis.
    "fp8_per_block32_dynamic": {"num_bits": FP8_E4M3, "type": "dynamic", "block_sizes": {"-2": 32}},
    # Softmax output P in [0, 1]: FP8 with the scale pinned to amax 1.0, as TensorRT's fused FP8 attention
    # expects; not calibrated.
    "fp8_unit_range": {"num_bits": FP8_E4M3, "axis": None, "constant_amax": 1.0},
    # NVFP4 weights with their FP8 block scales computed once, offline (calibration may search them,
    # e.g. ModelOpt's MSE sweep over FP8 scale values); the stored format is plain NVFP4.
    "nvfp4_block16_static": {"num_bits": NVFP4_E2M1,
                             "block_sizes": {"-1": 16, "type": "static", "scale_bits": FP8_E4M3}, "axis": None},
    # NVFP4: E2M1 values, one FP8 (E4M3) scale per 16 elements along the reduction axis, dynamic.
    "nvfp4_block16": {"num_bits": NVFP4_E2M1,
                      "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": FP8_E4M3}, "axis": None},
}

# ModelOpt runs these formats' fake quantization only on CUDA.
CUDA_ONLY_FORMATS = {"nvfp4_block16", "nvfp4_block16_static", "fp8_per_block32_dynamic"}


def describe_quantizer(num_bits, block_sizes, axis=None) -> str:
    """A short label for a ModelOpt quantizer's format, for reports."""
    bits = tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits
    name = {(4, 3): "fp8", (2, 1): "nvfp4", 8: "int8", 4: "int4"}.get(bits, f"bits{bits}")
    if block_sizes:
        sizes = [str(v) for k, v in block_sizes.items() if k not in ("type", "scale_bits", "scale_block_sizes")]
        return f"{name} per-block{'x'.join(sizes)}"
    return f"{name} per-tensor" if axis is None else f"{name} per-channel"
