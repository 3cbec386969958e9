"""cuDNN's fused FP8 attention (cudnn-frontend's graph API), as a baseline for benchmarks/attention_speed.py.

The recipe's attention: Q, K and V in FP8 E4M3 with per-tensor scales, Q K^T in FP32, softmax in FP32,
P quantized to FP8 with amax 1 (scale 448), P x V in FP8. On Hopper cuDNN writes FP8 outputs only (16-bit
outputs are Blackwell-only), so the caller gives the output's quantization scale.

Not in the pack's run time: on an H100 (cuDNN 9.19) it is faster than the pack's Triton kernel (1.03
against 1.24 ms at 8704 tokens), but it sums P x V in the FP8 tensor cores' reduced-precision accumulator:
rows that attend evenly over many keys come out low (17% over 8704 keys, 31% over 15650; attention_speed.py's
flat column), where the Triton kernel promotes each block's sum to FP32.

Needs the `nvidia-cudnn-frontend` package (the cuDNN library comes with PyTorch) and compute capability
9.0 or newer; `unavailable_reason(device)` says why it cannot run.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from engines.fp8 import FP8, FP8_MAX

# The graph's tensors, by uid (any distinct integers; the variant pack names tensors by them).
_Q, _K, _V, _O = 1, 2, 3, 4
_DESCALE_Q, _DESCALE_K, _DESCALE_V, _DESCALE_S, _SCALE_S, _SCALE_O = 5, 6, 7, 8, 9, 10
_AMAX_S, _AMAX_O = 11, 12


def frontend_version() -> str | None:
    """The installed nvidia-cudnn-frontend's version, None when it is not importable."""
    try:
        import cudnn
    except ImportError:
        return None
    return cudnn.__version__


@functools.cache
def unavailable_reason(device: torch.device) -> str | None:
    """None when cuDNN's FP8 attention can run on device, else why not (in words a user can act on).
    Builds one small FP8 attention graph: whether this cuDNN has an engine for it on this GPU is only
    known by asking."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < (9, 0):
        return (f"cuDNN's FP8 attention needs compute capability 9.0 or newer (Hopper, Blackwell); this GPU "
                f"has {capability[0]}.{capability[1]}")
    try:
        import cudnn
    except ImportError as e:
        return f"the nvidia-cudnn-frontend package is not importable ({e}); pip install nvidia-cudnn-frontend"
    layout = ((1, 1, 128, 128), (128 * 128, 128 * 128, 128, 1))
    try:
        _graph(device, *layout, *layout)
    except Exception as e:  # cudnnGraphNotSupportedError or an older cuDNN's refusal: report it as it came
        return (f"cuDNN {cudnn.backend_version_string()} has no FP8 attention engine for this GPU "
                f"({type(e).__name__}: {str(e)[:300]})")
    return None


class _Graph:
    """One built cuDNN FP8 SDPA graph for a layout of Q and of K and V, with its constant scales."""

    def __init__(self, device: torch.device, q_shape, q_stride, kv_shape, kv_stride):
        import cudnn

        batch, heads, q_len, head_dim = q_shape
        fp8 = cudnn.data_type.FP8_E4M3
        self.device = device
        self.handle = _handle(device)
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        q = graph.tensor(uid=_Q, dim=q_shape, stride=q_stride, data_type=fp8)
        k, v = (graph.tensor(uid=uid, dim=kv_shape, stride=kv_stride, data_type=fp8) for uid in (_K, _V))
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)
        descale_q, descale_k, descale_v, descale_s, scale_s, scale_o = (
            graph.tensor(uid=uid, **scalar)
            for uid in (_DESCALE_Q, _DESCALE_K, _DESCALE_V, _DESCALE_S, _SCALE_S, _SCALE_O))
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v, descale_s=descale_s,
            scale_s=scale_s, scale_o=scale_o, generate_stats=False, attn_scale=head_dim ** -0.5,
            use_causal_mask=False)
        # Written [B, L, H, D]: the layout the output projection reads, so no transpose follows.
        o.set_uid(_O).set_output(True).set_dim(q_shape).set_data_type(fp8) \
            .set_stride((q_len * heads * head_dim, head_dim, heads * head_dim, 1))
        for amax, uid in ((amax_s, _AMAX_S), (amax_o, _AMAX_O)):
            amax.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)) \
                .set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace_bytes = graph.get_workspace_size()
        # P is quantized with amax 1 (softmax probabilities), so its scale is the FP8 maximum.
        self.scale_s, self.descale_s = (torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
                                        for value in (FP8_MAX, 1.0 / FP8_MAX))
        self.amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=device)  # written, never read

    def __call__(self, q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, out_scale: Tensor, out: Tensor) -> None:
        import cudnn

        # cuDNN reads every scale from device memory (no host sync).
        descale_q, descale_k, descale_v = (s.view(1, 1, 1, 1) for s in scales.split(1))
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(self.device).cuda_stream)
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self.device)
        self.graph.execute({_Q: q8, _K: k8, _V: v8, _O: out, _DESCALE_Q: descale_q, _DESCALE_K: descale_k,
                            _DESCALE_V: descale_v, _DESCALE_S: self.descale_s, _SCALE_S: self.scale_s,
                            _SCALE_O: (1.0 / out_scale).reshape(1, 1, 1, 1),
                            _AMAX_S: self.amax[0:1], _AMAX_O: self.amax[1:2]},
                           workspace, handle=self.handle)


@functools.cache
def _handle(device: torch.device):
    import cudnn

    with torch.cuda.device(device):
        return cudnn.create_handle()


@functools.cache
def _graph(device: torch.device, q_shape, q_stride, kv_shape, kv_stride) -> _Graph:
    return _Graph(device, q_shape, q_stride, kv_shape, kv_stride)


def cudnn_fp8_attention(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, out_scale: Tensor) -> Tensor:
    """Attention of queries q8 [B, H, Lq, D] over keys k8 and values v8 [B, H, L, D] (FP8 E4M3, K and V in one
    layout; Q may be a slice of L's rows), scales [3] float32 (Q, K, V dequantization scales), out_scale (one
    float32) -> the output quantized to FP8: [B, Lq, H, D] = attention / out_scale. Scales on the GPU."""
    if not (q8.dtype == k8.dtype == v8.dtype == FP8):
        raise TypeError(f"cuDNN FP8 attention takes float8_e4m3fn Q, K, V; got {q8.dtype}, {k8.dtype}, {v8.dtype}")
    if k8.shape != v8.shape or k8.stride() != v8.stride():
        raise ValueError(f"cuDNN FP8 attention takes K and V of one shape and layout; got shapes {tuple(k8.shape)}, "
                         f"{tuple(v8.shape)} and strides {k8.stride()}, {v8.stride()}")
    if q8.dim() != 4 or q8.shape[:2] != k8.shape[:2] or q8.shape[3] != k8.shape[3]:
        raise ValueError(f"cuDNN FP8 attention: q8 {tuple(q8.shape)} and k8 {tuple(k8.shape)} must be [B, H, L, D] "
                         "with the same B, H and D")
    if (scales.dtype, scales.numel(), out_scale.dtype, out_scale.numel()) != (torch.float32, 3, torch.float32, 1):
        raise ValueError(f"cuDNN FP8 attention takes float32 scales: 3 for Q, K, V (got {scales.numel()} "
                         f"{scales.dtype}) and one for the output (got {out_scale.numel()} {out_scale.dtype})")
    batch, heads, q_len, head_dim = q8.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=FP8, device=q8.device)
    graph = _graph(q8.device, tuple(q8.shape), tuple(q8.stride()), tuple(k8.shape), tuple(k8.stride()))
    graph(q8, k8, v8, scales, out_scale, out)
    return out
