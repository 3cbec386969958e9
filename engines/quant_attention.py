"""The quantized form of `transformer.Attention`, registered with ModelOpt.

Imported only when quantizing (it imports ModelOpt). ModelOpt swaps every Attention for this class
in `mtq.quantize`, as it does nn.Linear for QuantLinear; its quantizers carry the names ModelOpt's
own attention plugins use (q/k/v_bmm_quantizer, softmax_quantizer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from modelopt.torch.quantization import register
from modelopt.torch.quantization.export_onnx import export_fp8_mha
from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer
from torch.onnx import symbolic_helper

from .fp8_attention import chunked_softmax_attention
from .transformer import Attention


class QuantAttention(QuantModule):
    """Attention with the recipe's quantizers, written out the way TensorRT's fused FP8 attention computes:

        S = Q_q K_q^T / sqrt(D)   in FP32 (BMM1: FP8 inputs, higher-precision accumulation)
        P = softmax(S)            in FP32, no quantizer on S
        O = P_q V_q               (BMM2: FP8 P with amax pinned to 1, FP8 V)
    """

    def _setup(self):
        self.q_bmm_quantizer = TensorQuantizer()
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()
        self.softmax_quantizer = TensorQuantizer()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        quantizers = (self.q_bmm_quantizer, self.k_bmm_quantizer, self.v_bmm_quantizer, self.softmax_quantizer)
        if not any(qz.is_enabled for qz in quantizers):
            return Attention.forward(self, q, k, v)
        if torch.onnx.is_in_onnx_export():
            return self._export_fp8(q, k, v)
        q, k, v = self.q_bmm_quantizer(q), self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)
        if not self.softmax_quantizer.is_enabled:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = chunked_softmax_attention(q, k, v, q.shape[-1] ** -0.5, self.softmax_quantizer).to(v.dtype)
        return x.transpose(1, 2).flatten(2)


    def _export_fp8(self, q, k, v):
        """The ONNX graph TensorRT fuses into FP8 attention: Q/DQ on Q, K, V and on softmax's output."""
        for qz in (self.q_bmm_quantizer, self.k_bmm_quantizer, self.v_bmm_quantizer):
            if qz.block_sizes or tuple(qz.num_bits) != (4, 3) or qz.amax is None or qz.amax.numel() != 1:
                raise ValueError("ONNX export: FP8 attention exports only with static FP8 per-tensor Q, K and V "
                                 "(the fp8 recipe); build this recipe with attention=False")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"ONNX export: FP8 attention needs a 16-bit model, got {q.dtype}")
        precision = "Half" if q.dtype == torch.float16 else "BFloat16"
        # An explicit cast, a no-op at run time: without it the TorchScript exporter types V (from a
        # split of a quantized Linear's output) as float32, and ModelOpt's FP8 MHA export refuses it.
        v = v.to(q.dtype)
        # The pattern quantizes Q and K after multiplying them by mha_prescale, so their amax is scaled alike: with
        # the calibrated amax as it is, the engine rounded Q * prescale on Q's grid, to other FP8 values than the
        # calibrated model's (and the small ones into FP8's subnormals); on the tiny test model that attention was
        # farther from the calibrated one than unquantized attention is (relative L2 8e-2 against 6e-2).
        prescale = mha_prescale(q.shape[-1])
        x = _FP8AttentionForExport.apply(q, k, v, float(self.q_bmm_quantizer.amax) * prescale,
                                         float(self.k_bmm_quantizer.amax) * prescale, float(self.v_bmm_quantizer.amax),
                                         precision)
        return x.transpose(1, 2).flatten(2)


def mha_prescale(head_dim: int) -> float:
    """The factor ModelOpt's FP8 attention export multiplies Q and K by before their Q/DQ: the square root of the
    score scale 1 / sqrt(D), applied to both operands of BMM1 (the pattern TensorRT fuses)."""
    return float(head_dim) ** -0.25


class _FP8AttentionForExport(torch.autograd.Function):
    """Stands for the quantized attention during ONNX export; its symbolic is ModelOpt's own FP8 MHA pattern.

    Written here rather than imported because ModelOpt's equivalent (FP8SDPA) lives in its diffusers
    plugin, which imports diffusers; ComfyUI installs do not have it.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_amax, k_amax, v_amax, precision):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    @symbolic_helper.parse_args("v", "v", "v", "f", "f", "f", "s")
    def symbolic(g, q, k, v, q_amax, k_amax, v_amax, precision):
        return export_fp8_mha(g, q, k, v, None, 0.0, False, None, q_amax, k_amax, v_amax, precision, False)


register(original_cls=Attention, quantized_cls=QuantAttention)
