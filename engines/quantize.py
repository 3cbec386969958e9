"""Quantize a Kontext transformer with ModelOpt per a recipe, and report what was quantized."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .quant_formats import describe_quantizer
from .recipes import Recipe
from .transformer import KontextTransformer

ForwardLoop = Callable[[nn.Module], None]


class QuantizationError(RuntimeError):
    """Quantization ran but its result does not match the recipe."""


@dataclass
class QuantReport:
    """What ModelOpt actually did: quantizer counts by kind and format, and every Linear left in 16-bit."""
    counts: dict[str, int] = field(default_factory=dict)  # "weight_quantizer fp8 per-tensor" -> n
    linear_16bit: list[str] = field(default_factory=list)
    linear_quantized: list[str] = field(default_factory=list)  # weights quantized (inputs too unless listed below)
    linear_weight_only: list[str] = field(default_factory=list)  # weights quantized, inputs 16-bit
    uncalibrated: list[str] = field(default_factory=list)  # enabled static quantizers without amax

    def summary(self) -> str:
        lines = [f"{len(self.linear_quantized)} Linear layers quantized, {len(self.linear_16bit)} kept in 16-bit:"]
        lines += [f"  16-bit: {name}" for name in self.linear_16bit]
        if self.linear_weight_only:
            lines.append(f"  {len(self.linear_weight_only)} of the quantized layers are weight-only (16-bit inputs)")
        lines += [f"  {n:5d} x {kind}" for kind, n in sorted(self.counts.items())]
        return "\n".join(lines)


def quant_report(model: nn.Module) -> QuantReport:
    from modelopt.torch.quantization.nn import TensorQuantizer

    report = QuantReport()
    counts = Counter()
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            kind = name.rsplit(".", 1)[-1]
            counts[f"{kind} {describe_quantizer(module.num_bits, module.block_sizes, module.axis)}"] += 1
            # Dynamic quantizers compute their scales per call; NVFP4's block scales are dynamic but its
            # per-tensor second-level scale is calibrated, so only the plain dynamic kind has no amax.
            dynamic = getattr(module, "_dynamic", False)
            if not dynamic and getattr(module, "amax", None) is None:
                report.uncalibrated.append(name)
        elif isinstance(module, nn.Linear):
            wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
            (report.linear_quantized if wq is not None and wq.is_enabled else report.linear_16bit).append(name)
            if wq is not None and wq.is_enabled and not iq.is_enabled:
                report.linear_weight_only.append(name)
    report.counts = dict(counts)
    return report


def quantize_transformer(model: KontextTransformer, recipe: Recipe, forward_loop: ForwardLoop | None) -> QuantReport:
    """Quantize `model` in place with ModelOpt and return the report; refuses a result that is not the recipe.

    With forward_loop=None nothing is calibrated (used when restoring a saved calibrated state).
    Recipes whose algorithm rewrites weights (SVDQuant) get private copies of the weights they
    quantize first, so the 16-bit tensors shared with the caller (ComfyUI's model) stay untouched.
    """
    import modelopt.torch.quantization as mtq

    from . import quant_attention  # noqa: F401  registers QuantAttention with ModelOpt

    if recipe.needs_cuda and not next(model.parameters()).is_cuda:
        raise QuantizationError(f"recipe {recipe.name}: ModelOpt fake-quantizes {recipe.gemm['weights']} only on "
                                "CUDA; move the model to an NVIDIA GPU or use the fp8 recipe")
    config = recipe.modelopt_config(model)
    if forward_loop is None:
        config["algorithm"] = None
    elif recipe.rewrites_weights:
        _privatize_quantized_weights(model, recipe)
    mtq.quantize(model, config, forward_loop)
    if forward_loop is not None:
        snap_fp8_scales_for_export(model)
    report = quant_report(model)
    check_report(report, recipe, calibrated=forward_loop is not None)
    return report


def snap_fp8_scales_for_export(model: KontextTransformer) -> int:
    """Move each calibrated static per-tensor FP8 quantizer's amax (by at most one step of the model's 16-bit
    dtype, 0.1% in FP16, 0.8% in BF16) to where its scale, amax / 448, is a value of that dtype; returns how many.

    ModelOpt's ONNX export writes every FP8 Q/DQ scale in the activations' dtype, so an engine quantizes with the
    calibrated scale rounded to 16 bits (BF16 keeps 8 significant bits). Measured on the tiny test model, that
    moved the engine's FP8 values off the calibrated model's and the PyTorch backend's by as much per GEMM as a
    wrong scale does (relative L2 up to 1.9e-2 from BF16, 7.8e-3 from FP16, against 2.6e-2 for a GEMM not
    quantizing its input at all). Snapped, and kept in float32 (448 * scale is exact there), the engine, the
    fake-quant model and the PyTorch backend quantize on one grid. Q and K are quantized after the export's
    pre-scaling (quant_attention.mha_prescale): theirs is snapped so the pre-scaled scale is the 16-bit value. The
    softmax output's scale is not calibrated (1 / 448 by construction) and is left alone.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from .fp8 import FP8_MAX
    from .quant_attention import mha_prescale

    dtype = model.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return 0  # a float32 export holds the float32 scale
    prescale = mha_prescale(model.config.head_dim)
    moved = 0
    for name, q in model.named_modules():
        if not (isinstance(q, TensorQuantizer) and q.is_enabled) or q.block_sizes or getattr(q, "_dynamic", False):
            continue
        bits = tuple(q.num_bits) if isinstance(q.num_bits, (list, tuple)) else q.num_bits
        if bits != (4, 3) or getattr(q, "_constant_amax", None) is not None or q.amax is None or q.amax.numel() != 1:
            continue
        factor = prescale if name.endswith(("q_bmm_quantizer", "k_bmm_quantizer")) else 1.0
        exported = _odd_nearest(float(q.amax) * factor / FP8_MAX, dtype)
        snapped = torch.tensor(exported * FP8_MAX / factor).reshape(q.amax.shape).to(q.amax.device)
        del q._amax  # the buffer is in the model's dtype, which cannot hold the snapped amax
        q.amax = snapped
        moved += 1
    return moved


def _odd_nearest(value: float, dtype: torch.dtype) -> float:
    """The value of dtype nearest to value whose last significand bit is 1. A scale with few significant bits (a
    16-bit value's nearest can be 7 * 2^-14) makes 16-bit inputs land exactly halfway between two FP8 values, where
    x / scale and x * (1 / scale), both in use (ONNX's Q/DQ and the backend divide, ModelOpt's fake quantization
    multiplies), round to different neighbours: measured on one such tiny-model layer, 0.4% of its weights. With all
    significant bits set, x / scale cannot be such a midpoint (of FP8's normal range) for FP16 or BF16 x: the product
    of the scale and a midpoint has more significant bits than x has."""
    nearest = torch.tensor(value, dtype=torch.float64).to(dtype)
    bits = nearest.view(torch.int16)
    if int(bits) & 1:
        return float(nearest)
    return min((float((bits + step).view(dtype)) for step in (-1, 1)), key=lambda v: abs(v - value))


def _privatize_quantized_weights(model: nn.Module, recipe: Recipe) -> None:
    import fnmatch

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p, _ in recipe.keep_16bit):
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def check_report(report: QuantReport, recipe: Recipe, calibrated: bool) -> None:
    """ModelOpt quantizing nothing, or a default pattern dropping layers, must not pass silently."""
    import fnmatch

    expected_16bit = sorted(n for n in report.linear_16bit + report.linear_quantized
                            if any(fnmatch.fnmatchcase(n, p) for p, _ in recipe.keep_16bit))
    if sorted(report.linear_16bit) != expected_16bit:
        extra = sorted(set(report.linear_16bit) - set(expected_16bit))
        raise QuantizationError(f"recipe {recipe.name}: layers left in 16-bit that the recipe quantizes: {extra[:8]}")
    if not report.linear_quantized:
        raise QuantizationError(f"recipe {recipe.name}: ModelOpt quantized no Linear layer")
    if recipe.attention and not any(k.startswith("q_bmm_quantizer") for k in report.counts):
        raise QuantizationError(f"recipe {recipe.name}: attention quantization was asked for but no attention "
                                "quantizer is enabled")
    if calibrated and report.uncalibrated:
        raise QuantizationError(f"recipe {recipe.name}: {len(report.uncalibrated)} quantizers got no calibration "
                                f"data (e.g. {report.uncalibrated[:3]}); did the forward loop run the model?")


def use_eager_fp8_fake_quant() -> None:
    """ModelOpt fake-quantizes FP8 on CUDA through an extension it compiles on first use (~1 min per machine);
    its eager path is the same arithmetic. Benchmarks that calibrate once take the eager path."""
    from modelopt.torch.quantization import extensions

    extensions.get_cuda_ext_fp8.extension = None


@torch.no_grad()
def output_error(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2) of output against reference, over all elements, in float64."""
    r, o = reference.double().flatten(), output.double().flatten()
    return (torch.nn.functional.cosine_similarity(r, o, dim=0).item(), ((o - r).norm() / r.norm()).item())
