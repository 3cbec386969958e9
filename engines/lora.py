"""LoRA on the PyTorch FP8 backend: a 16-bit low-rank branch beside each patched FP8 GEMM.

A patched FP8 layer computes  y = fp8_linear(x) + (x @ down^T) @ up^T  where x is the layer's 16-bit input
(before it is quantized), down [R, in] stacks every LoRA's down matrix and up [out, R] their up matrices, each
times its strength * alpha / rank: the sum of the LoRAs' products, added to what the FP8 weights compute. The
FP8 weights and their calibrated scales are never touched, so every LoRA, strength and stack runs on the same
loaded weights. (Merging into the weight and quantizing again measured 17-36% further from the 16-bit model with
the LoRA merged than the branch, on tiny models on a CPU: benchmarks/lora_accuracy.py.) A LoRA on a slice of a fused weight (diffusers / kohya q, k, v onto
`qkv` or `linear1`) fills only those rows (or columns) of the stacked factors.

Tensors the recipe keeps in 16-bit (embedders, final layer, biases, norm scales) take the caller's own exact
weight patch (ComfyUI's), written into them in place, their originals kept to put back. A patch the branch
cannot express (LoKr, LoHa, DoRA, a full diff, ...) on an FP8 weight is refused, naming the layer and the type.

Why the factors are laid out as they are (torch.compile of the blocks): Dynamo guards on whether a layer has a
branch and on the shapes of module buffers (parameters' and buffers' shapes are static), not on their values.
So the factors are buffers updated in place when only values change (a strength, another LoRA of the same
ranks: nothing recompiles, and captured CUDA graphs stay valid); the rank of each layer role (e.g. every
double block's img_attn.qkv) is rounded up to a power of two (>= 16) and shared by that role in all blocks,
zero-padded, so every block of a kind keeps running one compiled graph, and adding a LoRA recompiles only
when a role gains a branch or outgrows its rank bucket (once per new configuration; Dynamo keeps the
earlier ones).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .transformer import KontextTransformer

MIN_RANK_BUCKET = 16


class LoRAUnsupported(ValueError):
    """A patch the FP8 backend cannot apply as the 16-bit model would."""


@dataclass(frozen=True)
class LowRankPatch:
    """scale * up @ down added to a weight, or to its slice `offset` = (dim, start, length) (ComfyUI's
    (key, offset) form for a LoRA on part of a fused weight). scale: strength * alpha / rank."""
    up: Tensor  # [out or length, rank]
    down: Tensor  # [rank, in or length]
    scale: float
    offset: tuple[int, int, int] | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class InexpressiblePatch:
    """A patch that is not a plain low-rank product (kind: what it is, for the message)."""
    kind: str


Patch = LowRankPatch | InexpressiblePatch


@dataclass(frozen=True)
class KeyPatches:
    """Every patch on one tensor (BFL key), in order. exact(original) -> the patched tensor: the caller's own
    weight patch (ComfyUI's calculate_weight), applied to tensors kept in 16-bit."""
    patches: tuple[Patch, ...]
    exact: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _FP8Layer:
    module: nn.Module  # an FP8Linear


@dataclass(frozen=True)
class _FusedRow:
    index: int  # the layer's place in the model's FusedModulation
    leaf: str  # "weight" (FP8) or "bias" (16-bit)


@dataclass(frozen=True)
class _Tensor16:
    module: nn.Module
    leaf: str


def rank_bucket(rank: int) -> int:
    """The branch width a role with this total rank gets: the next power of two, at least MIN_RANK_BUCKET."""
    return max(MIN_RANK_BUCKET, 1 << max(rank - 1, 0).bit_length())


def role(layer: str) -> str:
    """A layer's name with its block index replaced: the layers every block of a kind has."""
    return re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.*.", layer)


def low_rank_factors(patches: Sequence[LowRankPatch], out_features: int, in_features: int, width: int,
                     dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(down [width, in], up [out, width]) whose product is the sum of the patches' scale * up @ down, each on its
    slice; columns past the patches' total rank are zero."""
    down = torch.zeros(width, in_features, dtype=torch.float32, device=device)
    up = torch.zeros(out_features, width, dtype=torch.float32, device=device)
    r0 = 0
    for p in patches:
        rows, cols = slice(0, out_features), slice(0, in_features)
        if p.offset is not None:
            dim, start, length = p.offset
            if dim == 0:
                rows = slice(start, start + length)
            else:
                cols = slice(start, start + length)
        r1 = r0 + p.rank
        up[rows, r0:r1] = p.up.to(device=device, dtype=torch.float32) * p.scale
        down[r0:r1, cols] = p.down.to(device=device, dtype=torch.float32)
        r0 = r1
    return down.to(dtype), up.to(dtype)


def _check_low_rank(key: str, p: LowRankPatch, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    want_out, want_in = out_features, in_features
    if p.offset is not None:
        dim, start, length = p.offset
        size = shape[dim] if dim in (0, 1) else None
        if size is None or start < 0 or start + length > size:
            raise LoRAUnsupported(f"LoRA on {key}: slice {p.offset} does not fit the weight's shape {shape}")
        want_out, want_in = (length, in_features) if dim == 0 else (out_features, length)
    if (p.up.ndim != 2 or p.down.ndim != 2 or p.up.shape[1] != p.down.shape[0]
            or tuple(p.up.shape[:1]) + tuple(p.down.shape[1:]) != (want_out, want_in)):
        raise LoRAUnsupported(f"LoRA on {key}: up {tuple(p.up.shape)} @ down {tuple(p.down.shape)} does not make the "
                              f"{(want_out, want_in)} {'slice' if p.offset else 'weight'} it patches (a LoRA for "
                              "another model?)")


class LoRAApplier:
    """Applies per-key patches to a model made by runtime_torch.load_fp8_transformer, and takes them off again.

    Keys are the BFL names of the 16-bit model's tensors ("double_blocks.0.img_attn.qkv.weight"), whichever
    module holds them here (an FP8Linear, a row range of the FusedModulation, a 16-bit Linear, a norm)."""

    def __init__(self, model: KontextTransformer):
        from .runtime_torch import FP8Linear, modulation_linears

        self.model = model
        fused = getattr(model, "fused_modulation", None)
        fused_index = {name: i for i, name in enumerate(modulation_linears(model))} if fused is not None else {}
        self._targets: dict[str, object] = {}
        for key in meta_tensors(model.config):
            layer, _, leaf = key.rpartition(".")
            if layer in fused_index:
                self._targets[key] = _FusedRow(fused_index[layer], leaf)
                continue
            module = model.get_submodule(layer)
            self._targets[key] = _FP8Layer(module) if isinstance(module, FP8Linear) and leaf == "weight" \
                else _Tensor16(module, leaf)
        self._originals: dict[str, Tensor] = {}  # key -> its unpatched value (CPU), while patched
        self.applied = None  # the caller's id of the patches applied (None: none)

    def keys(self) -> list[str]:
        return list(self._targets)

    def __contains__(self, key: str) -> bool:
        return key in self._targets

    def tensors(self) -> dict[str, Tensor]:
        """Every key's tensor as this model holds it (FP8 weights as their FP8 buffers): the names and shapes
        a LoRA key mapping needs."""
        return {key: self._tensor(key) for key in self._targets}

    def is_fp8(self, key: str) -> bool:
        target = self._targets.get(key)
        return isinstance(target, _FP8Layer) or (isinstance(target, _FusedRow) and target.leaf == "weight")

    def check(self, patches: Mapping[str, Sequence[Patch]]) -> None:
        """Raises LoRAUnsupported for any patch this backend cannot apply exactly; nothing is changed."""
        for key, entries in patches.items():
            if key not in self._targets:
                raise LoRAUnsupported(f"patch on {key}: this Kontext has no such tensor")
            if not self.is_fp8(key):
                continue  # 16-bit: the caller's own weight patch is applied as it is
            shape = tuple(self._tensor(key).shape)
            for p in entries:
                if isinstance(p, InexpressiblePatch):
                    raise LoRAUnsupported(
                        f"{p.kind} patch on {key}: that layer is FP8 in this quantized Kontext, and the FP8 backend "
                        "applies only plain low-rank LoRA (down/up) to FP8 layers, beside their GEMMs; a "
                        f"{p.kind} patch would have to be merged into the FP8 weight. Use a plain LoRA, or the "
                        "original model")
                _check_low_rank(key, p, shape)

    @torch.no_grad()
    def apply(self, patches: Mapping[str, KeyPatches], applied_id=None) -> None:
        """Make the model compute the 16-bit model with exactly `patches` applied (an empty mapping: none),
        whatever was applied before. Raises before changing anything if a patch cannot be applied."""
        self.check({key: kp.patches for key, kp in patches.items()})
        with torch.inference_mode():
            exact = self._exact_values({k: kp.exact for k, kp in patches.items() if not self.is_fp8(k)})
            self._apply_branches({k: kp.patches for k, kp in patches.items() if self.is_fp8(k)})
            for key in [k for k in self._originals if k not in exact]:
                self._tensor(key).copy_(self._originals.pop(key))
            for key, (original, patched) in exact.items():
                self._originals.setdefault(key, original)
                self._tensor(key).copy_(patched)
        self.applied = applied_id if patches else None

    def remove(self) -> None:
        self.apply({})

    # ---------------------------------------------------------------- internals

    def _tensor(self, key: str) -> Tensor:
        """The key's tensor now (looked up each time: moving a module to another device replaces its buffers)."""
        target = self._targets[key]
        if isinstance(target, _FP8Layer):
            return target.module.weight
        if isinstance(target, _FusedRow):
            fused = self.model.fused_modulation
            start = sum(fused.sizes[:target.index])
            return getattr(fused, target.leaf)[start:start + fused.sizes[target.index]]
        return getattr(target.module, target.leaf)

    def _exact_values(self, exact: Mapping[str, Callable[[Tensor], Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """{key: (its unpatched value on the CPU, its patched value)}, every one computed before any is written."""
        out = {}
        for key, fn in exact.items():
            tensor = self._tensor(key)
            original = self._originals.get(key)
            original = tensor.detach().to("cpu", copy=True) if original is None else original
            patched = fn(original.to(tensor.device, copy=True))
            if tuple(patched.shape) != tuple(tensor.shape):
                raise LoRAUnsupported(f"patch on {key}: it makes a {tuple(patched.shape)} tensor of the "
                                      f"{tuple(tensor.shape)} one (a reshaped weight cannot be applied here)")
            out[key] = (original, patched)
        return out

    def _apply_branches(self, patches: Mapping[str, Sequence[LowRankPatch]]) -> None:
        dtype = self.model.dtype
        layers = {key: t.module for key, t in self._targets.items() if isinstance(t, _FP8Layer)}
        widths: dict[str, int] = {}
        for key, entries in patches.items():
            if key in layers:
                r = role(key)
                widths[r] = max(widths.get(r, 0), sum(p.rank for p in entries))
        for key, module in layers.items():
            width = widths.get(role(key))
            if not width:
                module.lora_down = module.lora_up = None
                continue
            out_features, in_features = module.weight.shape
            down, up = low_rank_factors(patches.get(key, ()), out_features, in_features, rank_bucket(width), dtype,
                                        module.weight.device)
            _set_buffers(module, down, up)
        fused = getattr(self.model, "fused_modulation", None)
        if fused is None:
            return
        rows = {t.index: patches[key] for key, t in self._targets.items()
                if isinstance(t, _FusedRow) and t.leaf == "weight" and key in patches}
        if not rows:
            fused.lora_down = fused.lora_up = None
            return
        width = rank_bucket(max(sum(p.rank for p in entries) for entries in rows.values()))
        in_features = fused.weight.shape[1]
        factors = [low_rank_factors(rows.get(i, ()), size, in_features, width, dtype, fused.weight.device)
                   for i, size in enumerate(fused.sizes)]
        _set_buffers(fused, torch.cat([d for d, _ in factors]), torch.cat([u for _, u in factors]))


def _set_buffers(module: nn.Module, down: Tensor, up: Tensor) -> None:
    """module.lora_down / lora_up := down / up, written into the existing buffers when shapes and dtypes match
    (compiled code and captured CUDA graphs keep reading the same tensors), else replacing them."""
    old_down, old_up = module.lora_down, module.lora_up
    if (old_down is not None and old_up is not None and old_down.shape == down.shape and old_up.shape == up.shape
            and old_down.dtype == down.dtype and old_down.device == down.device):
        old_down.copy_(down)
        old_up.copy_(up)
    else:
        module.lora_down, module.lora_up = down, up


def meta_tensors(config) -> dict[str, Tensor]:
    """The 16-bit model's tensors by BFL key, on the meta device (names and shapes, no memory)."""
    with torch.device("meta"):
        return dict(KontextTransformer(config).state_dict())


def merged_state_dict(sd: Mapping[str, Tensor], patches: Mapping[str, Sequence[LowRankPatch]]) -> dict[str, Tensor]:
    """A 16-bit state dict with low-rank patches merged into its weights, in float32 (the reference the FP8
    backend is measured against: what ComfyUI computes for a 16-bit model). sd's tensors are not modified."""
    out = dict(sd)
    for key, entries in patches.items():
        weight = out[key].float().clone()
        for p in entries:
            target = weight if p.offset is None else weight.narrow(*p.offset)
            target += p.scale * (p.up.float() @ p.down.float())
        out[key] = weight.to(sd[key].dtype)
    return out


def random_lora(sd: Mapping[str, Tensor], keys: Sequence[str], rank: int, seed: int,
                magnitude: float = 0.5) -> dict[str, tuple[Tensor, Tensor]]:
    """{key: (up [out, rank], down [rank, in])} with random factors whose product's norm is `magnitude` times the
    weight's, for tests and benchmarks (a trained LoRA's factors are not random; their effect's size is what
    matters to the error)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        w = sd[key].float()
        up, down = torch.randn(w.shape[0], rank, generator=g), torch.randn(rank, w.shape[1], generator=g)
        out[key] = (up * (magnitude * w.norm() / (up @ down).norm()), down)
    return out

