"""The PyTorch backend: the calibrated FP8 transformer run natively, no TensorRT needed.

Built from the source checkpoint and a calibrated state, one tensor at a time: each quantized
Linear's weight is read, cast to FP8 E4M3 with its calibrated scale and the 16-bit copy dropped, so
the 16-bit model is never held whole (a Kontext costs ~12 GB, not 24). Layers the recipe keeps in
16-bit stay 16-bit.

FP8Linear runs `torch._scaled_mm` (real FP8 GEMMs with the calibrated static scales) on GPUs that
have FP8 tensor cores (compute capability >= 8.9); elsewhere it computes in 16-bit from the FP8
weights, quantizing activations the same way, so the numbers are the calibrated model's everywhere.
When the state was calibrated with attention quantization (the recipe's default), attention runs
in FP8 too (`fp8_attention.py`: a fused Triton kernel on those GPUs, the recipe in PyTorch elsewhere).
The weight-only modulation Linears of all blocks become one FusedModulation (one GEMV kernel a step); the
MLPs' GELU and the FP8 quantization after it are one Triton kernel (FP8GELUMLP, FP8SingleStreamBlock) on those
GPUs, and elsewhere GELU is written in the form Inductor compiles cheaper (SigmoidGELU).
`compile_blocks` makes it fast: each block compiled, the quantization of activations fused into the
ops that produce them.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibrated_state import check_calibrated_state
from .fp8 import FP8, FP8_MAX, fp8_tensor_cores, quantize_fp8
from .fp8_attention import FP8Attention
from .fp8_attention_fa3 import resolve_fa3_library
from .kernel_ops import custom_op, triton_fp8_kernels_available
from .recipes import ATTENTION_QUANTIZERS
from .source_weights import FP8Weight, SourceWeights
from .transformer import Attention, KontextTransformer, SingleStreamBlock


class BackendError(ValueError):
    """A calibrated state or checkpoint this backend cannot run."""


class FP8Linear(nn.Module):
    """y = (x quantized to FP8 with input_scale) @ (FP8 weight * weight_scale)^T + bias.

    input_scale None: weight-only (16-bit activations), as the recipes use for the modulation GEMMs.
    lora_down [R, in] / lora_up [out, R] (16-bit, set by lora.LoRAApplier): a low-rank branch on the 16-bit x,
    added to the output (the LoRAs applied to this layer, their strengths folded into lora_up).
    """

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fp8_forward(x)
        return out if self.lora_down is None else out + self.lora(x)

    def fp8_forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None and fp8_tensor_cores(x.device):
            shape = x.shape
            out = self.matmul_fp8(quantize_fp8(x.reshape(-1, shape[-1]), self.input_scale), x.dtype)
            return out.reshape(*shape[:-1], out.shape[-1])
        if self.input_scale is None:
            return weight_only_fp8_linear(x, self.weight, self.weight_scale, self.bias)
        x = (quantize_fp8(x, self.input_scale).float() * self.input_scale).to(x.dtype)
        return F.linear(x, (self.weight.float() * self.weight_scale).to(x.dtype), self.bias)

    def lora(self, x: Tensor) -> Tensor:
        """The low-rank branch's output for the layer's 16-bit input x (lora_down must be set)."""
        return F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))

    def matmul_fp8(self, x8: Tensor, out_dtype: torch.dtype) -> Tensor:
        """x8 [rows, in_features], already FP8 at input_scale -> [rows, out_features] (FP8 tensor cores)."""
        return torch._scaled_mm(x8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                bias=self.bias, out_dtype=out_dtype)


# Weight-only layers run on one row per sample (the modulation: 3.2 B of the 11.9 B weights). Dequantizing
# their weights to 16-bit for F.linear every step moved ~10 GB on an H100 (3.2 ms of a 215 ms step) and
# the GEMV then read 16-bit weights again; written as multiply-and-sum, Inductor makes one reduction kernel
# that reads each FP8 weight once. Eager, the [rows, N, K] product would be materialized: compiled only.
GEMV_ROWS = 8


def weight_only_fp8_linear(x: Tensor, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (16-bit) @ (weight_fp8 * weight_scale)^T + bias, without a Triton kernel: the multiply-and-sum below
    when compiled and x has few rows, else F.linear of the weights dequantized to x's dtype."""
    if torch.compiler.is_compiling() and x.numel() <= GEMV_ROWS * x.shape[-1]:
        return fp8_weight_gemv(x, weight_fp8, weight_scale, bias)
    return F.linear(x, (weight_fp8.float() * weight_scale).to(x.dtype), bias)


def fp8_weight_gemv(x: Tensor, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] (few rows) @ (weight_fp8 [N, K] * weight_scale)^T + bias, accumulated in FP32."""
    out = (x.float().unsqueeze(-2) * weight_fp8.float()).sum(-1) * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _gemv(x: Tensor, weight_fp8: Tensor, row_scales: Tensor, bias: Tensor) -> Tensor:
    from .fp8_gemv_triton import fp8_gemv

    return fp8_gemv(x, weight_fp8, row_scales, bias)


def _gemv_shape(x: Tensor, weight_fp8: Tensor, row_scales: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight_fp8.shape[0]))


fused_fp8_gemv = custom_op("fp8_gemv", _gemv, _gemv_shape)


class FusedModulation(nn.Module):
    """Every block's weight-only FP8 modulation Linear as one: vec [B, dim] -> their outputs, in block order.

    All of them read the same SiLU(vec): on GPUs with FP8 tensor cores one kernel (`fp8_gemv_triton.py`)
    reads the 3.2 GB of FP8 weights once per step, where 57 per-block reductions read them at a quarter of
    an H100's bandwidth (4.4 ms of a 200 ms step). Holds the only copy of those weights; each row keeps
    its layer's scale. Elsewhere each layer's slice runs as FP8Linear would. lora_down [layers x R, in] /
    lora_up [rows, R] (set by lora.LoRAApplier): each layer's low-rank branch, R columns per layer.
    """

    def __init__(self, weight_fp8: Tensor, layers: list[FP8Linear]):
        super().__init__()
        self.sizes = [layer.weight.shape[0] for layer in layers]
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("scales", torch.stack([layer.weight_scale for layer in layers]))
        self.register_buffer("row_scales", torch.repeat_interleave(self.scales, torch.tensor(self.sizes,
                                                                                         device=weight_fp8.device)))
        self.register_buffer("bias", torch.cat([layer.bias for layer in layers]))
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)

    def forward(self, vec: Tensor) -> list[Tensor]:
        x = F.silu(vec)
        if x.shape[0] <= GEMV_ROWS and triton_fp8_kernels_available(x.device):
            outs = list(fused_fp8_gemv(x, self.weight, self.row_scales, self.bias).split(self.sizes, dim=-1))
        else:
            outs = [weight_only_fp8_linear(x, w, scale, b)
                    for w, scale, b in zip(self.weight.split(self.sizes), self.scales, self.bias.split(self.sizes))]
        if self.lora_down is None:
            return outs
        # All layers read the same x: one GEMM makes every layer's rank-R projection, then each its own up.
        hidden = F.linear(x, self.lora_down.to(x.dtype)).chunk(len(self.sizes), dim=-1)
        ups = self.lora_up.to(x.dtype).split(self.sizes)
        return [out + F.linear(h, up) for out, h, up in zip(outs, hidden, ups)]


class ComputedByFusedModulation(nn.Module):
    """Stands in for a modulation Linear whose weights live in the model's fused_modulation."""

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this block's modulation is computed by the model's fused_modulation: call the "
                           "KontextTransformer, not the block on its own")


# sqrt(2 / pi), doubled: GELU's tanh approximation is x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x^3)).
GELU_SIGMOID_SCALE = 2 * (2 / 3.141592653589793) ** 0.5


def gelu_tanh_as_sigmoid(x: Tensor) -> Tensor:
    """GELU's tanh approximation written with tanh(z) = 2 sigmoid(2z) - 1: the same function, in float32."""
    xf = x.float()
    return (xf * torch.sigmoid(GELU_SIGMOID_SCALE * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidGELU(nn.Module):
    """nn.GELU(approximate="tanh"), compiled as gelu_tanh_as_sigmoid: Inductor makes the sigmoid one
    exponential where tanh is a libdevice call, and the kernels that apply it (fused with the FP8
    quantization of linear2's / the MLP's input) are bound by their arithmetic. On an H100 at 8704 tokens
    the single blocks' one went from 0.234 to 0.200 ms, the double blocks' from 0.165 to 0.135, with the
    same FP8 outputs. Eager, the written-out form would be several kernels where F.gelu is one. (Where the
    pack's Triton kernels run, FP8GELUMLP and FP8SingleStreamBlock use gelu_fp8_triton's kernel instead.)"""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return gelu_tanh_as_sigmoid(x)
        return F.gelu(x, approximate="tanh")


def use_sigmoid_gelu(model: nn.Module) -> None:
    """Every tanh-approximated nn.GELU in model becomes a SigmoidGELU."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.GELU) and module.approximate == "tanh":
            model.set_submodule(name, SigmoidGELU())


def _gelu_fp8(x: Tensor, scale: Tensor, prefix: Optional[Tensor]) -> Tensor:
    from .gelu_fp8_triton import gelu_fp8

    return gelu_fp8(x, scale, prefix)


def _gelu_fp8_shape(x: Tensor, scale: Tensor, prefix: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1] + (0 if prefix is None else prefix.shape[1])), dtype=FP8)


fused_gelu_fp8 = custom_op("gelu_fp8", _gelu_fp8, _gelu_fp8_shape)


def runs_fused_gelu(linear: nn.Module, x: Tensor, n_prefix: int, n_hidden: int) -> bool:
    """Whether linear's input [prefix | GELU(hidden)] can be made by the fused GELU + FP8 kernel: linear quantizes
    its input to FP8, the pack's Triton kernels run on x's device, and the widths tile."""
    if not (isinstance(linear, FP8Linear) and linear.input_scale is not None and triton_fp8_kernels_available(x.device)):
        return False
    from .gelu_fp8_triton import tile_columns

    return tile_columns(n_prefix, n_hidden) > 0


def fused_gelu_linear(linear: FP8Linear, hidden: Tensor, prefix: Tensor | None = None) -> Tensor:
    """linear([prefix | GELU(hidden)]) with its FP8 input made by the fused kernel (runs_fused_gelu must hold):
    hidden [..., n_hidden], prefix [..., n_prefix] or None -> [..., out_features] in hidden's dtype."""
    x8 = fused_gelu_fp8(hidden.reshape(-1, hidden.shape[-1]), linear.input_scale,
                        None if prefix is None else prefix.reshape(-1, prefix.shape[-1]))
    out = linear.matmul_fp8(x8, hidden.dtype)
    out = out.reshape(*hidden.shape[:-1], out.shape[-1])
    if linear.lora_down is None:
        return out
    # The fused kernel's 16-bit input is never materialized; the branch needs it (the kernel's GELU is this one).
    x = F.gelu(hidden, approximate="tanh")
    return out + linear.lora(x if prefix is None else torch.cat((prefix, x), dim=-1))


class FP8GELUMLP(nn.Sequential):
    """A double block's MLP (Linear, GELU, Linear) whose hidden activations go from the first GEMM's output to
    the second's FP8 input in one pass (gelu_fp8_triton.py) where that kernel runs; elsewhere the Sequential.
    fused_gelu=False leaves the GELU and quantization to PyTorch / Inductor (for the benchmark)."""

    fused_gelu = True

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self
        hidden = fc1(x)
        if not (self.fused_gelu and runs_fused_gelu(fc2, hidden, 0, hidden.shape[-1])):
            return fc2(act(hidden))
        return fused_gelu_linear(fc2, hidden)


class FP8SingleStreamBlock(SingleStreamBlock):
    """A single block whose linear2 input, [attention output, GELU(MLP-in)], is made in FP8 in one pass
    (gelu_fp8_triton.py) where that kernel runs; elsewhere SingleStreamBlock's."""

    fused_gelu = True

    def output_projection(self, attn: Tensor, mlp: Tensor) -> Tensor:
        if not (self.fused_gelu and runs_fused_gelu(self.linear2, attn, attn.shape[-1], mlp.shape[-1])):
            return super().output_projection(attn, mlp)
        return fused_gelu_linear(self.linear2, mlp, prefix=attn)


def use_fused_gelu(model: KontextTransformer) -> None:
    """The double blocks' MLPs become FP8GELUMLP, the single blocks FP8SingleStreamBlock (same modules, same
    weights: only how the GELU and linear2's / the MLP's FP8 input are computed changes)."""
    for block in model.double_blocks:
        for name in ("img_mlp", "txt_mlp"):
            setattr(block, name, FP8GELUMLP(*getattr(block, name)))
    for block in model.single_blocks:
        block.__class__ = FP8SingleStreamBlock  # a subclass adding no state: only output_projection differs


def modulation_linears(model: KontextTransformer) -> list[str]:
    """The modulation Linears' names in the order KontextTransformer.fused_modulation returns them."""
    return ([f"double_blocks.{i}.{stream}_mod.lin" for i in range(len(model.double_blocks)) for stream in ("img", "txt")]
            + [f"single_blocks.{i}.modulation.lin" for i in range(len(model.single_blocks))])


def runs_recipe(recipe) -> bool:
    """Whether this backend runs the recipe: per-tensor FP8 GEMMs (the fp8 recipe)."""
    return recipe.gemm == {"weights": "fp8_per_tensor", "activations": "fp8_per_tensor"}


def load_fp8_transformer(weights: SourceWeights | Callable[[str], Tensor], state_path, device="cpu",
                         dtype: torch.dtype = torch.bfloat16, fp8_attention: bool = True,
                         fuse_modulation: bool = True, attention_kernel: str = "auto") -> KontextTransformer:
    """A KontextTransformer whose quantized Linears are FP8Linear, from a checkpoint and a calibrated state.

    weights: the checkpoint's SourceWeights (source_weights.open_checkpoint), or get_tensor(name) returning a
    16-bit tensor for a BFL key; tensors are read one at a time. An FP8 per-tensor layer of the source (an
    fp8_scaled or comfy_quant file) is taken as it is, with its own scale: calibration pinned the weight scale to
    it, and a state whose weight scale differs was calibrated from other weights and is refused. Attention is FP8Attention when the state
    was calibrated with attention quantization, unless fp8_attention=False (16-bit SDPA, for comparison).
    attention_kernel ("auto", "triton", "flashattention3") picks its kernel on a CUDA GPU
    (`fp8_attention_fa3.resolve_fa3_library`: auto takes FlashAttention-3 where it is built and the GPU is Hopper).
    When the recipe makes every modulation Linear weight-only FP8 (the fp8 recipe does), they become
    one FusedModulation, unless fuse_modulation=False.
    """
    fa3_library = resolve_fa3_library(attention_kernel, torch.device(device))  # a bad choice fails before any load
    # Every quantizer the recipe calibrates has a finite, positive amax, or this raises naming it: a missing input
    # amax would otherwise run that layer with 16-bit activations, a NaN one give NaN images.
    state = check_calibrated_state(state_path)  # a state file, or an exported checkpoint's header
    recipe, config, amax = state.recipe, state.config, state.amax
    if not runs_recipe(recipe):
        raise BackendError(f"{state_path}: the PyTorch backend runs the fp8 recipe; this state is {recipe.name} "
                           f"({recipe.gemm['weights']}): use its TensorRT engine")
    get_tensor = _named_reads(weights.get if isinstance(weights, SourceWeights) else weights)

    with torch.device("meta"):
        model = KontextTransformer(config, dtype=dtype)
    keep = [p for p, _ in recipe.keep_16bit]
    fused = modulation_linears(model)
    fuse_modulation = fuse_modulation and all(
        not any(fnmatch.fnmatchcase(name, p) for p in keep) and f"{name}.input_quantizer._amax" not in amax
        for name in fused)
    if fuse_modulation:  # each layer's FP8 weight is written straight into its rows: never two copies
        rows = [model.get_submodule(name).out_features for name in fused]
        fused_weight = torch.empty(sum(rows), config.hidden_size, dtype=FP8, device=device)
        fused_rows = dict(zip(fused, fused_weight.split(rows)))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight = get_tensor(f"{name}.weight")
        shape = tuple((weight.data if isinstance(weight, FP8Weight) else weight).shape)
        if shape != (module.out_features, module.in_features):
            raise BackendError(f"checkpoint: {name}.weight has shape {shape}, but the calibrated state "
                               f"{state_path} was made for a model with ({module.out_features}, {module.in_features})")
        bias = get_tensor(f"{name}.bias").to(device, dtype) if module.bias is not None else None
        if any(fnmatch.fnmatchcase(name, p) for p in keep):
            weight = weight.dequantize(dtype, device) if isinstance(weight, FP8Weight) else weight.to(device, dtype)
            replacement = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            replacement.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})},
                                        assign=True)
        else:
            w_amax = amax.get(f"{name}.weight_quantizer._amax")
            if w_amax is None:
                raise BackendError(f"{state_path}: no calibrated weight scale for {name}")
            i_amax = amax.get(f"{name}.input_quantizer._amax")
            w_scale = w_amax.to(device).float() / FP8_MAX
            if isinstance(weight, FP8Weight):
                source_scale = weight.scale.to(device).float()
                if not torch.allclose(w_scale, source_scale, rtol=1e-6, atol=0):
                    raise BackendError(
                        f"{state_path}: {name}'s calibrated weight scale {w_scale.item():.6g} is not the checkpoint's "
                        f"FP8 scale {source_scale.item():.6g}: the state was calibrated from other weights than "
                        f"{getattr(weights, 'name', 'this checkpoint')}")
                weight_fp8, w_scale = weight.data.to(device), source_scale
            else:
                weight_fp8 = quantize_fp8(weight.to(device), w_scale)
            if fuse_modulation and name in fused_rows:
                weight_fp8 = fused_rows[name].copy_(weight_fp8)
            replacement = FP8Linear(weight_fp8, w_scale, bias,
                                    None if i_amax is None else i_amax.to(device).float() / FP8_MAX)
        del weight
        model.set_submodule(name, replacement)
    if fuse_modulation:
        model.fused_modulation = FusedModulation(fused_weight, [model.get_submodule(name) for name in fused])
        for name in fused:
            model.set_submodule(name, ComputedByFusedModulation())
    if recipe.attention and fp8_attention:
        _use_fp8_attention(model, amax, state_path, device, fa3_library)
        if fa3_library:
            kernel = f"FlashAttention-3 ({fa3_library})"
        elif triton_fp8_kernels_available(torch.device(device)):
            kernel = "the Triton kernel"
        else:
            kernel = "PyTorch (the recipe written out; no FP8 tensor cores or Triton here)"
        logging.info("Kontext TRT: FP8 attention by %s", kernel)
    use_sigmoid_gelu(model)
    use_fused_gelu(model)
    for name, p in list(model.named_parameters()):  # the RMSNorm scales
        if p.is_meta:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Parameter(get_tensor(name).to(device, dtype), requires_grad=False))
    return model.eval().requires_grad_(False)


def _named_reads(get_tensor: Callable[[str], Tensor]) -> Callable[[str], Tensor]:
    """get_tensor whose failures (a key the checkpoint lacks, a file cut short) name the key and what to do."""
    from safetensors import SafetensorError

    def read(key: str) -> Tensor:
        try:
            t = get_tensor(key)
        except (SafetensorError, KeyError, OSError, RuntimeError, ValueError) as e:
            raise BackendError(f"checkpoint: reading tensor {key} failed ({type(e).__name__}: {e}); expected the "
                               "Kontext checkpoint the engine was built from, complete and undamaged") from e
        if not (torch.is_tensor(t) or isinstance(t, FP8Weight)):
            raise BackendError(f"checkpoint: {key}: expected a tensor, got {type(t).__name__}")
        return t
    return read


def _use_fp8_attention(model: KontextTransformer, amax: dict[str, Tensor], state_path, device,
                       fa3_library: str | None) -> None:
    for name, module in list(model.named_modules()):
        if not isinstance(module, Attention):
            continue
        scales = []
        for role in ("q", "k", "v"):
            key = f"{name}.{ATTENTION_QUANTIZERS[role]}._amax"
            if key not in amax or amax[key].numel() != 1:
                raise BackendError(f"{state_path}: the recipe quantizes attention but {key} is "
                                   f"{'missing' if key not in amax else 'not per-tensor'}")
            scales.append(amax[key].to(device).float() / FP8_MAX)
        attention = FP8Attention(*scales)
        attention.fa3_library = fa3_library
        model.set_submodule(name, attention)


def compile_blocks(model: KontextTransformer, mode: str | None = None, tune: bool = False,
                   pick_reductions: bool = True) -> KontextTransformer:
    """torch.compile each transformer block (CUDA): Inductor fuses the elementwise work (norms, RoPE,
    modulation, GELU) and the FP8 quantization of every GEMM / attention input into the op that produces
    it. Per block, not whole-model: the 19 double and 38 single blocks share two graphs, so the first
    step compiles twice, not 57 times. mode="reduce-overhead" replays each block as a CUDA graph. tune:
    Inductor also tunes each generated kernel's launch parameters (coordinate descent; longer first step).
    pick_reductions: the LayerNorms' rows reduced in one pass (`inductor_choices.py`; False: Inductor's
    defaults, as a plain torch.compile has them)."""
    if mode not in (None, "reduce-overhead"):
        raise ValueError(f"compile_blocks: mode {mode!r}; expected None or 'reduce-overhead'")
    kwargs = {"mode": mode}
    if tune:  # torch.compile takes a mode or options, not both; "reduce-overhead" is Inductor's CUDA graphs option
        kwargs = {"options": {"coordinate_descent_tuning": True, "triton.cudagraphs": mode == "reduce-overhead"}}
    compiled = list(model.double_blocks) + list(model.single_blocks)
    if getattr(model, "fused_modulation", None) is not None:  # (ComfyUI's Flux, compiled by the benchmarks, has none)
        compiled.append(model.fused_modulation)
    if pick_reductions:
        from .inductor_choices import with_persistent_rows
    for module in compiled:
        module.compile(**kwargs)
        if pick_reductions:
            # nn.Module.compile keeps its compiled call here; the wrapper runs it (and so the compilation at its
            # first calls) with the choices installed.
            module._compiled_call_impl = with_persistent_rows(module._compiled_call_impl)
    return model


def transformer_bytes(model: nn.Module) -> int:
    """GPU memory the backend's weights take (what ComfyUI's model management should count)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
