"""The quantized form of `transformer.Attention`, registered with ModelOpt.

Imported only when quantizing (it imports ModelOpt). ModelOpt swaps every Attention for this class
in `mtq.quantize`, as it does nn.Linear for QuantLinear; its quantizers carry the names ModelOpt's
own attention plugins use (q/k/v_bmm_quantizer, softmax_quantizer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from modelopt.torch.quantization import register
from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

from .transformer import Attention

# Heads per chunk of the explicit QK^T / softmax / PV: 8704 tokens x 8704 x 4 bytes is 300 MB per head.
HEADS_PER_CHUNK = 4


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
        q, k, v = self.q_bmm_quantizer(q), self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)
        if not self.softmax_quantizer.is_enabled:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = q.shape[-1] ** -0.5
            chunks = []
            for h in range(0, q.shape[1], HEADS_PER_CHUNK):
                qh, kh, vh = (t[:, h:h + HEADS_PER_CHUNK].float() for t in (q, k, v))
                p = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
                chunks.append(self.softmax_quantizer(p) @ vh)
            x = torch.cat(chunks, dim=1).to(v.dtype)
        return x.transpose(1, 2).flatten(2)


register(original_cls=Attention, quantized_cls=QuantAttention)
