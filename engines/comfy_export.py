"""The calibrated Kontext as one ComfyUI-native checkpoint: ComfyUI's mixed-precision layout, self-describing.

Per quantized Linear (ComfyUI 0.8's comfy/ops.py mixed-precision ops and comfy/quant_ops.py):
- FP8 per-tensor: `weight` float8_e4m3fn, `weight_scale` (float32, value = weight * weight_scale), `input_scale`
  (the calibrated static activation scale) and a `comfy_quant` JSON tensor {"format": "float8_e4m3fn"}; a
  weight-only layer (the recipes' modulation) has no input_scale and "full_precision_matrix_mult", so ComfyUI keeps
  its activations 16-bit as the recipe does. The same layers also carry ComfyUI 0.3.64's names (`scale_weight`,
  `scale_input` and the `scaled_fp8` marker), which 0.3.64's scaled FP8 ops read: the file loads in both.
- NVFP4: `weight` uint8 (two E2M1 values a byte, high nibble first), `weight_scale` float8_e4m3fn block scales in
  cuBLAS's tiled layout, `weight_scale_2` (float32 per-tensor), `input_scale`, comfy_quant {"format": "nvfp4"}
  (ComfyUI 0.8 only: 0.3.64 has no NVFP4 and fails loudly on the packed shapes).
Layers the recipe keeps 16-bit stay in the source's dtype. The header's `_quantization_metadata` lists every
quantized layer (what ComfyUI 0.8 reads first) and `kontext_trt` holds the pack's own: recipe, model config, source
(name, format, fingerprint) and every calibrated amax (attention's included), so the file alone is a complete
source for the pack's loader and build node.
"""
from __future__ import annotations

import fnmatch
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import write_atomically
from .calibrated_state import PACK_KEY, STATE_FORMAT, read_calibrated
from .fp8 import FP8, FP8_MAX, quantize_fp8
from .scratch import Scratch, remove_abandoned_scratch
from .source_weights import FP8Weight, SourceWeights
from .transformer import KontextTransformer

EXPORT_FORMAT = "kontext-trt-comfy-checkpoint/1"
E2M1_MAX = 6.0
SAFETENSORS_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", FP8: "F8_E4M3",
                     torch.uint8: "U8"}


class ExportError(ValueError):
    """A calibrated model this export cannot write in ComfyUI's layout."""


def layer_formats(recipe, linear_names) -> dict[str, tuple[str, str | None] | None]:
    """name -> (weight format, activation format or None for weight-only), or None where the recipe keeps the layer
    16-bit: the recipe's entries in the order ModelOpt applies them (a later match wins)."""
    out = {}
    for name in linear_names:
        fmt = (recipe.gemm["weights"], recipe.gemm["activations"])
        for pattern, weights, activations, _ in recipe.gemm_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                fmt = (weights, activations)
        for pattern, weights, _ in recipe.weight_only:
            if fnmatch.fnmatchcase(name, pattern):
                fmt = (weights, None)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern, _ in recipe.keep_16bit):
            fmt = None
        out[name] = fmt
    return out


def _comfy_quant(conf: dict) -> Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _scalar(value: Tensor) -> Tensor:
    return value.detach().float().reshape(()).cpu()


def roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def to_blocked(scales: Tensor) -> Tensor:
    """[rows, cols] block scales -> cuBLAS's tiled layout [roundup(rows, 128), roundup(cols, 4)] (128 x 4 tiles, each
    stored as 32 x 16), as comfy-kitchen's quantize_nvfp4 writes them. Written here because engines/ imports neither
    ComfyUI nor its kernels; tests check it against comfy-kitchen's own dequantization."""
    rows, cols = scales.shape
    padded = torch.zeros(roundup(rows, 128), roundup(cols, 4), dtype=scales.dtype)
    padded[:rows, :cols] = scales
    blocks = padded.view(padded.shape[0] // 128, 128, padded.shape[1] // 4, 4).permute(0, 2, 1, 3)
    tiles = blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16)
    return tiles.reshape(padded.shape)


E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_nvfp4(w: Tensor, global_amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [rows, cols / 2], blocked FP8 block scales, float32 per-tensor scale) of a [rows, cols] weight,
    cols a multiple of 16: per 16 values an FP8 scale of their max / 6 relative to global_amax / (6 * 448), each
    value rounded to the nearest E2M1 (ties to the even code), high nibble first."""
    rows, cols = w.shape
    if cols % 16 or rows % 16:
        raise ExportError(f"NVFP4 export: weight shape {tuple(w.shape)} is not a multiple of 16")
    scale_2 = _scalar(global_amax) / (E2M1_MAX * FP8_MAX)
    blocks = w.float().reshape(rows, cols // 16, 16)
    block_scale = (blocks.abs().amax(-1) / E2M1_MAX / scale_2).clamp(max=FP8_MAX).to(FP8)
    total = block_scale.float() * scale_2
    scaled = torch.where(total[..., None] == 0, torch.zeros_like(blocks), blocks / total[..., None].clamp_min(1e-30))
    scaled = scaled.clamp(-E2M1_MAX, E2M1_MAX)
    # Nearest E2M1 magnitude; on a tie the even code (the one with a 0 mantissa bit) wins, as a hardware cast does.
    dist = (scaled.abs()[..., None] - E2M1_VALUES).abs()
    code = dist.argmin(-1)
    tie = (dist.min(-1).values[..., None] == dist).sum(-1) > 1
    code = torch.where(tie & (code % 2 == 1), code + 1, code)
    code = code | ((scaled < 0) & (code > 0)).to(code.dtype) << 3
    code = code.reshape(rows, cols).to(torch.uint8)
    packed = (code[:, 0::2] << 4) | code[:, 1::2]
    return packed, to_blocked(block_scale), scale_2


def dequantize_nvfp4(packed: Tensor, blocked_scale: Tensor, scale_2: Tensor, shape) -> Tensor:
    """The inverse of quantize_nvfp4 (float32), for the pack's tests and checks."""
    rows, cols = shape
    codes = torch.stack([packed >> 4, packed & 0xF], -1).reshape(rows, cols).long()
    values = E2M1_VALUES[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    padded_rows, padded_cols = roundup(rows, 128), roundup(cols // 16, 4)
    tiles = blocked_scale.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(padded_rows // 128, padded_cols // 4, 128, 4)
    scales = tiles.permute(0, 2, 1, 3).reshape(padded_rows, padded_cols)[:rows, : cols // 16]
    return (values.reshape(rows, cols // 16, 16) * (scales.float() * scale_2)[..., None]).reshape(rows, cols)


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Tensor]


def export_comfy_checkpoint(weights: SourceWeights, state_path, path, source: dict | None = None) -> Path:
    """Write the calibrated model (source `weights` + calibrated state) as one safetensors checkpoint in ComfyUI's
    mixed-precision layout, one tensor at a time, atomically. source: the sidecar's record of the weights' file."""
    recipe, config, amax = read_calibrated(state_path)
    if recipe.rewrites_weights:
        raise ExportError(f"recipe {recipe.name}: its low-rank branch and smoothed weights have no layout in ComfyUI's "
                          "mixed-precision checkpoints; export the fp8 or nvfp4 recipe, or use its TensorRT engine")
    non_scalar = sorted(k for k, v in amax.items() if v.numel() != 1)
    if non_scalar:
        raise ExportError(f"{state_path}: per-channel amax ({non_scalar[:3]}) has no ComfyUI per-tensor layout")
    with torch.device("meta"):
        model = KontextTransformer(config)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    formats = layer_formats(recipe, linear)
    entries, layers_meta = [], {}

    def amax_of(name, which):
        key = f"{name}.{which}._amax"
        if key not in amax:
            raise ExportError(f"{state_path}: the recipe quantizes {name} but the state has no {key}")
        return amax[key]

    for key in weights.keys:
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        fmt = formats.get(name) if name in linear else None
        if fmt is None:
            entries.append(_sixteen_bit(weights, key))
            continue
        weight_fmt, act_fmt = fmt
        shape = (linear[name].out_features, linear[name].in_features)
        if weight_fmt == "fp8_per_tensor":
            scale = _scalar(amax_of(name, "weight_quantizer")) / FP8_MAX
            entries.append(Entry(key, FP8, shape, lambda key=key, scale=scale: _fp8_weight(weights.get(key), scale)))
            entries += [Entry(f"{name}.weight_scale", torch.float32, (), lambda s=scale: s),
                        Entry(f"{name}.scale_weight", torch.float32, (), lambda s=scale: s)]
            conf = {"format": "float8_e4m3fn"}
            if act_fmt is None:
                conf["full_precision_matrix_mult"] = True
            elif act_fmt == "fp8_per_tensor":
                inp = _scalar(amax_of(name, "input_quantizer")) / FP8_MAX
                entries += [Entry(f"{name}.input_scale", torch.float32, (), lambda s=inp: s),
                            Entry(f"{name}.scale_input", torch.float32, (), lambda s=inp: s)]
            else:
                raise ExportError(f"{name}: FP8 weights with {act_fmt} activations have no ComfyUI layout")
        elif weight_fmt.startswith("nvfp4_block16"):
            global_amax = amax_of(name, "weight_quantizer")
            rows, cols = shape
            packed_shape, scale_shape = (rows, cols // 2), (roundup(rows, 128), roundup(cols // 16, 4))
            made = {}

            def part(i, key=key, global_amax=global_amax, made=made):
                if "w" not in made:  # the three tensors of one layer come from one quantization
                    made["w"] = quantize_nvfp4(weights.tensor(key, torch.float32), global_amax)
                return made.pop("w")[i] if i == 2 else made["w"][i]

            entries += [Entry(key, torch.uint8, packed_shape, lambda p=part: p(0)),
                        Entry(f"{name}.weight_scale", FP8, scale_shape, lambda p=part: p(1)),
                        Entry(f"{name}.weight_scale_2", torch.float32, (), lambda p=part: p(2))]
            conf = {"format": "nvfp4"}
            if act_fmt is None:
                conf["full_precision_matrix_mult"] = True
            else:
                inp = _scalar(amax_of(name, "input_quantizer")) / (E2M1_MAX * FP8_MAX)
                entries.append(Entry(f"{name}.input_scale", torch.float32, (), lambda s=inp: s))
        else:
            raise ExportError(f"{name}: weight format {weight_fmt} has no ComfyUI mixed-precision layout")
        entries.append(Entry(f"{name}.comfy_quant", torch.uint8, (len(json.dumps(conf).encode()),),
                             lambda c=conf: _comfy_quant(c)))
        layers_meta[name] = conf
    if any(conf["format"] == "float8_e4m3fn" for conf in layers_meta.values()):
        entries.append(Entry("scaled_fp8", FP8, (0,), lambda: torch.empty(0, dtype=FP8)))  # ComfyUI 0.3.64's marker
    pack = {"format": EXPORT_FORMAT, "recipe": json.loads(recipe.to_json()), "kontext_config": config.to_dict(),
            "source": source or {},
            "amax": {k: {"value": float(_scalar(v)), "shape": list(v.shape)} for k, v in sorted(amax.items())}}
    metadata = {"format": EXPORT_FORMAT, "_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                               "layers": layers_meta}),
                PACK_KEY: json.dumps(pack)}
    # 12-24 GB written in a scratch folder beside the file: one killed mid-write is removed by the next export or
    # ComfyUI's start (scratch.py), not left as a hidden .partial for good.
    remove_abandoned_scratch(Path(path).parent)
    with Scratch(Path(path).parent) as scratch:
        return write_atomically(path, lambda tmp: write_safetensors(tmp, entries, metadata), tmp_dir=scratch.path)


def _sixteen_bit(weights: SourceWeights, key: str) -> Entry:
    t = weights.get(key)
    if isinstance(t, FP8Weight):
        return Entry(key, torch.bfloat16, tuple(t.data.shape), lambda: weights.tensor(key, torch.bfloat16))
    return Entry(key, t.dtype, tuple(t.shape), lambda: weights.get(key))


def _fp8_weight(t, scale: Tensor) -> Tensor:
    if isinstance(t, FP8Weight):  # pinned at calibration: the source's own FP8 values and scale
        if not torch.equal(t.scale.float().cpu(), scale):
            raise ExportError(f"weight scale {scale.item():.6g} is not the FP8 source's {t.scale.item():.6g}: the state "
                              "was calibrated from other weights")
        return t.data
    return quantize_fp8(t, scale.to(t.device))


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """The safetensors format written one tensor at a time: safetensors' own save_file takes every tensor at once,
    which for a Kontext is its whole 12-24 GB. Header (8-byte little-endian length, JSON with each tensor's dtype,
    shape and byte range, padded to 8 bytes), then the tensors' bytes in the header's order."""
    header, offset = {"__metadata__": metadata}, 0
    for e in entries:
        nbytes = _numel(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        header[e.key] = {"dtype": SAFETENSORS_CODES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = e.make().detach().to("cpu").contiguous()
            if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                raise ExportError(f"{e.key}: made {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_exported_checkpoint(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception:  # not a safetensors file at all: not one of ours
        return False


def write_state_from_checkpoint(path, state_path, tmp_dir=None) -> Path:
    """The calibrated state embedded in an exported checkpoint, as a state file the build resumes from."""
    from safetensors.torch import save_file

    from . import __version__

    recipe, config, amax = read_calibrated(path)
    metadata = {"format": STATE_FORMAT, "recipe": recipe.to_json(), "recipe_source": str(path),
                "kontext_config": json.dumps(config.to_dict(), sort_keys=True), "pack_version": __version__}
    tensors = {k: v.contiguous() for k, v in amax.items()}
    return write_atomically(state_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), tmp_dir=tmp_dir)
