"""A Kontext transformer's weights as ComfyUI users have them, read one tensor at a time.

The files people have for FLUX.1 Kontext [dev]:
- BFL's 16-bit `flux1-kontext-dev.safetensors` (or the same keys under ComfyUI's prefixes);
- Comfy-Org's `fp8_scaled` files: a `scaled_fp8` marker tensor, FP8 E4M3 Linear weights each with a float32
  `scale_weight` (value = weight * scale_weight) and usually a `scale_input`;
- ComfyUI 0.8's mixed-precision files: a per-layer `comfy_quant` JSON tensor (or `_quantization_metadata` in the
  header) naming the layer's format, with `weight_scale` / `input_scale`; only float8_e4m3fn layers are FP8
  per-tensor, which is what this pack can take as it is;
- ComfyUI's own MODEL, whose diffusion model holds either of the above as ComfyUI loaded it (0.3.64's scaled
  FP8 ops keep `scale_weight`; 0.8.0 converts both kinds into comfy-kitchen QuantizedTensor weights).

`SourceWeights` gives every one of them the same face: the transformer's BFL keys, FP8 layers as (FP8 weight,
its scale) untouched, everything else as the floating tensor it is. Nothing here imports ComfyUI: a
QuantizedTensor is recognised by what it holds (`_qdata`, `_params.scale`, `_layout_cls`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .state_dict import KNOWN_PREFIXES, NotKontextError

FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Per-layer entries that describe a layer's quantization rather than hold one of its weights.
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2",
                  ".comfy_quant")
# comfy-kitchen's layout class names for FP8 E4M3 per-tensor weights (ComfyUI 0.8's comfy/ops.py lists them).
FP8_LAYOUTS = ("TensorCoreFP8E4M3Layout", "TensorCoreFP8Layout")


class SourceFormatError(NotKontextError):
    """A checkpoint (or MODEL) in a format this pack cannot read: names the file, the layer and the format."""


@dataclass(frozen=True)
class FP8Weight:
    """One Linear weight stored as FP8 E4M3 with a per-tensor scale: its value is data * scale."""
    data: Tensor  # float8_e4m3fn, [out, in]
    scale: Tensor  # float32 scalar

    def dequantize(self, dtype: torch.dtype, device=None) -> Tensor:
        data = self.data if device is None else self.data.to(device)
        return (data.float() * self.scale.to(data.device).float()).to(dtype)


class SourceWeights:
    """The transformer's tensors by BFL key, with FP8 layers as FP8Weight; `get` reads one at a time.

    name: what the weights came from (a file name, or "ComfyUI MODEL"); format: "bf16" / "fp16" / "fp32",
    "fp8_scaled", "comfy_quant_fp8" or "fp8_e4m3fn" (FP8 weights without scales, i.e. scale 1).
    """

    def __init__(self, name: str, fmt: str, keys: Iterable[str], read: Callable[[str], Tensor],
                 fp8_scales: Mapping[str, Callable[[], Tensor]], input_scales: Mapping[str, Callable[[], Tensor]],
                 shape_of: Callable[[str], tuple[int, ...]]):
        self.name, self.format = name, fmt
        self._shape_of = shape_of
        self._fingerprint = None
        self.keys = sorted(keys)
        self._read = read
        self._fp8_scales = dict(fp8_scales)  # layer name -> its weight scale, read on demand
        self._input_scales = dict(input_scales)

    @property
    def fp8_layers(self) -> list[str]:
        return sorted(self._fp8_scales)

    def is_fp8(self, key: str) -> bool:
        return key.endswith(".weight") and key[: -len(".weight")] in self._fp8_scales

    def get(self, key: str) -> Tensor | FP8Weight:
        """The tensor as stored: FP8Weight for an FP8 layer's weight, else the floating tensor."""
        t = self._read(key)
        if self.is_fp8(key):
            return FP8Weight(t, self._fp8_scales[key[: -len(".weight")]]().float().reshape(()))
        return t

    def tensor(self, key: str, dtype: torch.dtype, device=None) -> Tensor:
        """The tensor's value in dtype (an FP8 weight dequantized with its scale)."""
        t = self.get(key)
        if isinstance(t, FP8Weight):
            return t.dequantize(dtype, device)
        return t.to(device=device, dtype=dtype) if device is not None else t.to(dtype)

    def input_scale(self, layer: str) -> Tensor | None:
        """The source's static activation scale for an FP8 layer (ComfyUI's own FP8 GEMMs use it), if any."""
        read = self._input_scales.get(layer)
        return None if read is None else read().float().reshape(())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file's header (nothing is read)."""
        return {k: tuple(self._shape_of(k)) for k in self.keys}

    def fingerprint(self) -> str:
        """weights_fingerprint, computed once per SourceWeights (its tensors are not expected to change)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self)
        return self._fingerprint

    def describe(self) -> dict:
        """What an engine's sidecar records of its source."""
        return {"name": self.name, "format": self.format, "fingerprint": self.fingerprint(),
                "fp8_layers": len(self._fp8_scales)}


def _canonical_bytes(t: Tensor) -> bytes:
    """A floating tensor's values as bytes that do not depend on the dtype holding them: bfloat16 when every value
    is one (BFL's file, and ComfyUI's float32 copy of it on a CPU, hash alike), float32 otherwise."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype != torch.bfloat16:
        as_bf16 = t.to(torch.bfloat16)
        if not torch.equal(as_bf16.float(), t.float()):
            return t.float().view(torch.uint8).numpy().tobytes()
        t = as_bf16
    return t.view(torch.uint8).numpy().tobytes()


def fp8_fingerprint(weights: SourceWeights) -> str:
    """SHA-256 over the FP8 layers alone (bytes and scales): finds the file an FP8 MODEL was loaded from, whose
    other tensors ComfyUI may hold rounded (0.3.64 keeps a scaled-FP8 model's biases in FP8)."""
    h = hashlib.sha256()
    for layer in weights.fp8_layers:
        t = weights.get(f"{layer}.weight")
        h.update(f"{layer}|{tuple(t.data.shape)}|".encode())
        h.update(t.data.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        h.update(t.scale.detach().to("cpu").float().reshape(1).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(weights: SourceWeights) -> str:
    """SHA-256 over every weight's value: each key and shape, FP8 layers as their FP8 bytes and scale, others as
    _canonical_bytes. Every tensor is read whole, so any change to any weight changes it; the activation scales
    and format markers are not weights and are not hashed. Streams one tensor at a time."""
    h = hashlib.sha256()
    for key in weights.keys:
        t = weights.get(key)
        if isinstance(t, FP8Weight):
            h.update(f"{key}|fp8|{tuple(t.data.shape)}|".encode())
            h.update(t.data.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            h.update(t.scale.detach().to("cpu").float().reshape(1).numpy().tobytes())
        else:
            h.update(f"{key}|{tuple(t.shape)}|".encode())
            h.update(_canonical_bytes(t))
    return h.hexdigest()


_FILE_FINGERPRINTS: dict[tuple, str] = {}


def file_fingerprint(path: str | Path, fp8_only: bool = False) -> str:
    """weights_fingerprint (or fp8_fingerprint) of a checkpoint file, remembered for this process by path, size
    and modification time (reading 12-24 GB again at every load would cost tens of seconds)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, fp8_only)
    if key not in _FILE_FINGERPRINTS:
        with open_checkpoint(path) as weights:
            _FILE_FINGERPRINTS[key] = fp8_fingerprint(weights) if fp8_only else weights.fingerprint()
    return _FILE_FINGERPRINTS[key]


def layout(weights: SourceWeights) -> tuple:
    """What a file's header says of the transformer (keys, shapes, FP8 layers): two sources with other layouts
    cannot hold the same weights, so only files of a MODEL's layout need fingerprinting to find its file."""
    return tuple(sorted(weights.shapes().items())), tuple(weights.fp8_layers)


def _layer_of(key: str, suffix: str) -> str:
    return key[: -len(suffix)]


def _check_float(where: str, key: str, t_dtype: torch.dtype) -> None:
    if t_dtype not in FLOAT_DTYPES:
        raise SourceFormatError(
            f"{where}: layer {key} is stored as {str(t_dtype).removeprefix('torch.')}, which this pack cannot read "
            "(expected bf16 / fp16 / fp32 tensors, or FP8 E4M3 per-tensor layers with their scales: BFL's 16-bit "
            "Kontext, ComfyUI's fp8_scaled or its comfy_quant float8_e4m3fn files)")


def _classify(where: str, keys: list[str], dtype_of: Callable[[str], torch.dtype], formats: Mapping[str, str],
              scaled_fp8: bool) -> tuple[str, set[str]]:
    """(format name, FP8 layer names) for a transformer's keys (prefix stripped); refuses what cannot be read."""
    fp8_layers = set()
    for layer, layer_format in formats.items():
        if layer_format != "float8_e4m3fn":
            raise SourceFormatError(f"{where}: layer {layer} is quantized as {layer_format!r}; this pack reads "
                                    "float8_e4m3fn layers (FP8 per-tensor) and 16-bit ones, not NVFP4, MXFP8, "
                                    "int8 or other formats")
        fp8_layers.add(layer)
    weight_keys = [k for k in keys if not k.endswith(SCALE_SUFFIXES)]
    unscaled = False
    for key in weight_keys:
        dtype = dtype_of(key)
        layer = _layer_of(key, ".weight") if key.endswith(".weight") else None
        if dtype == FP8:
            if layer in fp8_layers:
                continue
            if scaled_fp8 and f"{layer}.scale_weight" in keys:
                fp8_layers.add(layer)
                continue
            if layer is None:
                if scaled_fp8:
                    continue  # ComfyUI 0.3.64's scaled FP8 ops hold Linear biases in FP8 too: a value like any other
                raise SourceFormatError(f"{where}: {key} is FP8 but is not a Linear weight")
            unscaled = True  # ComfyUI's plain fp8_e4m3fn weights: the scale is 1
            fp8_layers.add(layer)
            continue
        if dtype == torch.float8_e5m2:
            raise SourceFormatError(f"{where}: layer {key} is float8_e5m2; this pack reads FP8 E4M3 "
                                    "(float8_e4m3fn) weights and 16-bit ones")
        if layer in fp8_layers:
            raise SourceFormatError(f"{where}: layer {layer} is marked float8_e4m3fn but its weight is "
                                    f"{str(dtype).removeprefix('torch.')}")
        _check_float(where, key, dtype)
    if formats:
        fmt = "comfy_quant_fp8"
    elif scaled_fp8:
        fmt = "fp8_scaled"
    elif unscaled:
        fmt = "fp8_e4m3fn"
    else:
        dtypes = {dtype_of(k) for k in weight_keys}
        fmt = "/".join(sorted(str(d).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
                              .replace("float32", "fp32") for d in dtypes))
    return fmt, fp8_layers


def _scale_reader(read: Callable[[str], Tensor], keys: set[str], layer: str, names: tuple[str, ...]):
    for name in names:
        key = f"{layer}.{name}"
        if key in keys:
            return lambda key=key: read(key)
    return None


def _weights(where: str, keys: list[str], read: Callable[[str], Tensor], dtype_of: Callable[[str], torch.dtype],
             shape_of: Callable[[str], tuple], formats: Mapping[str, str], scaled_fp8: bool) -> SourceWeights:
    fmt, fp8_layers = _classify(where, keys, dtype_of, formats, scaled_fp8)
    key_set = set(keys)
    fp8_scales, input_scales = {}, {}
    for layer in fp8_layers:
        scale = _scale_reader(read, key_set, layer, ("weight_scale", "scale_weight"))
        if scale is None:
            if fmt == "comfy_quant_fp8":
                raise SourceFormatError(f"{where}: layer {layer} is float8_e4m3fn but has no {layer}.weight_scale")
            scale = lambda: torch.ones((), dtype=torch.float32)  # noqa: E731  unscaled FP8 (ComfyUI's scale 1)
        fp8_scales[layer] = scale
        inp = _scale_reader(read, key_set, layer, ("input_scale", "scale_input"))
        if inp is not None:
            input_scales[layer] = inp
    weight_keys = [k for k in keys if not k.endswith(SCALE_SUFFIXES)]
    return SourceWeights(where, fmt, weight_keys, read, fp8_scales, input_scales, shape_of)


def _quant_formats(read_meta: Callable[[str], Tensor], keys: list[str], header: Mapping[str, str] | None) -> dict:
    formats = {}
    if header and "_quantization_metadata" in header:
        for layer, conf in json.loads(header["_quantization_metadata"]).get("layers", {}).items():
            formats[layer] = conf.get("format")
    for key in keys:
        if key.endswith(".comfy_quant"):
            conf = json.loads(bytes(read_meta(key).to(torch.uint8).tolist()).decode("utf-8"))
            formats[_layer_of(key, ".comfy_quant")] = conf.get("format")
    return formats


@contextmanager
def open_checkpoint(path: str | Path, name: str | None = None):
    """SourceWeights over a .safetensors checkpoint file, read lazily (one tensor at a time) while the context
    is open. Refuses files this pack cannot read, naming the file, the layer and the format."""
    from safetensors import safe_open

    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected a .safetensors file, got {str(path)!r} (no such file)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        raise SourceFormatError(f"{name}: a GGUF file; this pack reads .safetensors checkpoints (BFL's 16-bit "
                                "Kontext, ComfyUI's fp8_scaled or comfy_quant float8_e4m3fn files)")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise SourceFormatError(f"{name}: not a readable .safetensors file ({e})") from e
    with handle as f:
        all_keys = list(f.keys())
        prefix = next((p for p in KNOWN_PREFIXES if p + "img_in.weight" in all_keys), None)
        if prefix is None:
            raise NotKontextError(f"{name}: no Flux/Kontext transformer in it (no 'img_in.weight' under "
                                  f"{[p for p in KNOWN_PREFIXES if p]}); it has e.g. {sorted(all_keys)[:5]}")
        keys = [k[len(prefix):] for k in all_keys if k.startswith(prefix)]
        scaled_fp8 = "scaled_fp8" in keys
        keys = [k for k in keys if k != "scaled_fp8"]

        def read(key):
            return f.get_tensor(prefix + key)

        def dtype_of(key):
            return _safetensors_dtype(f.get_slice(prefix + key).get_dtype(), name, key)

        def shape_of(key):
            return f.get_slice(prefix + key).get_shape()

        formats = _quant_formats(read, keys, f.metadata())
        yield _weights(name, keys, read, dtype_of, shape_of, formats, scaled_fp8)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": FP8,
                      "F8_E5M2": torch.float8_e5m2, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8,
                      "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "BOOL": torch.bool}


def _safetensors_dtype(code: str, name: str, key: str) -> torch.dtype:
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise SourceFormatError(f"{name}: layer {key} is stored as {code}, which this pack cannot read")
    return dtype


def _plain(t):
    """A comfy-kitchen QuantizedTensor's FP8 storage (duck-typed: engines/ never imports ComfyUI), or t itself."""
    qdata = getattr(t, "_qdata", None)
    return t if qdata is None else qdata


def from_state_dict(sd: Mapping[str, Tensor], name: str = "ComfyUI MODEL") -> SourceWeights:
    """SourceWeights over an in-memory state dict: a file's tensors, or a ComfyUI MODEL's diffusion model
    (0.3.64's scaled FP8 ops, 0.8's QuantizedTensor weights). The tensors are shared, never copied."""
    prefix = next((p for p in KNOWN_PREFIXES if p + "img_in.weight" in sd), None)
    if prefix is None:
        raise NotKontextError(
            "state dict: expected a Flux/Kontext transformer with key 'img_in.weight' (optionally under "
            f"{[p for p in KNOWN_PREFIXES if p]}), got {len(sd)} keys starting {sorted(sd)[:5]}")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    scaled_fp8 = "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd)
    sd.pop("scaled_fp8", None)
    formats = {}
    for key, t in sd.items():
        layout = getattr(t, "_layout_cls", None)
        if layout is not None:
            layout = layout if isinstance(layout, str) else getattr(layout, "__name__", str(layout))
            layer = _layer_of(key, ".weight")
            formats[layer] = "float8_e4m3fn" if layout in FP8_LAYOUTS and _plain(t).dtype == FP8 else layout
    formats.update(_quant_formats(sd.__getitem__, [k for k in sd if k.endswith(".comfy_quant")], None))
    for key, t in list(sd.items()):
        if getattr(t, "_qdata", None) is not None and f"{_layer_of(key, '.weight')}.weight_scale" not in sd:
            sd[f"{_layer_of(key, '.weight')}.weight_scale"] = t._params.scale
    keys = list(sd)
    return _weights(name, keys, lambda k: _plain(sd[k]), lambda k: _plain(sd[k]).dtype, lambda k: _plain(sd[k]).shape,
                    formats, scaled_fp8)


def with_patches(weights: SourceWeights, patched: Mapping[str, Callable[[Tensor], Tensor]],
                 fp8_dtype: torch.dtype = torch.bfloat16) -> SourceWeights:
    """weights with each key of `patched` read as patched[key](its value in float32), cast back to the tensor's own
    dtype; a patched FP8 layer's weight becomes a 16-bit one (fp8_dtype) from then on, calibrated afresh (a LoRA
    merged into an FP8 weight is quantized again). Only the patched tensors are new; each is made when read."""
    unknown = sorted(set(patched) - set(weights.keys))
    if unknown:
        raise NotKontextError(f"{weights.name}: patches on tensors it does not have: {unknown[:5]}")

    def read(key):
        t = weights.get(key)
        if key not in patched:
            return t.data if isinstance(t, FP8Weight) else t
        value = t.dequantize(torch.float32) if isinstance(t, FP8Weight) else t.to(torch.float32)
        return patched[key](value).to(fp8_dtype if isinstance(t, FP8Weight) else t.dtype)

    layers = {key[: -len(".weight")] for key in patched if weights.is_fp8(key)}
    return SourceWeights(weights.name, weights.format, weights.keys, read,
                         {k: v for k, v in weights._fp8_scales.items() if k not in layers},
                         {k: v for k, v in weights._input_scales.items() if k not in layers}, weights._shape_of)


def transformer_from_source(weights: SourceWeights, dtype: torch.dtype | None = None, device=None):
    """A KontextTransformer over `weights` for calibration: 16-bit tensors shared as they are (no copy when
    already in dtype); each FP8 layer inside the blocks keeps its FP8 weight, with its scale in the model's
    `fp8_weight_scales` (name -> scale), to be dequantized block by block while calibrating
    (`dequantized_blocks`) or at once (`dequantize_fp8_weights`). FP8 layers outside the blocks (embedders,
    final layer: ~1% of the weights) are dequantized here. dtype: the 16-bit dtype to compute in (default:
    the source's own floating dtype). device: where the tensors go as they are read (None: where they are)."""
    from torch import nn

    from .state_dict import config_from_state_dict, transformer_from_state_dict

    shapes = {k: torch.empty(s, device="meta") for k, s in weights.shapes().items()}
    config = config_from_state_dict(shapes)
    if dtype is None:
        floats = {weights.get(k).dtype for k in weights.keys if not weights.is_fp8(k)}
        dtype = floats.pop() if len(floats) == 1 else torch.bfloat16
    sd, scales = {}, {}
    for key in weights.keys:
        t = weights.get(key)
        if isinstance(t, FP8Weight) and device is not None:
            t = FP8Weight(t.data.to(device), t.scale.to(device))
        elif device is not None:
            t = t.to(device)
        if isinstance(t, FP8Weight) and key.startswith(("double_blocks.", "single_blocks.")):
            sd[key] = t.data
            scales[key[: -len(".weight")]] = t.scale
        else:
            sd[key] = t.dequantize(dtype) if isinstance(t, FP8Weight) else t.to(dtype)
    if not scales:
        model = transformer_from_state_dict(sd, config)
    else:
        # transformer_from_state_dict wants one dtype: assign the FP8 weights after it, into their Linears.
        fp8 = {f"{name}.weight": sd.pop(f"{name}.weight") for name in scales}
        model = transformer_from_state_dict({**sd, **{k: torch.empty(v.shape, dtype=dtype, device="meta")
                                                      for k, v in fp8.items()}}, config)
        for key, data in fp8.items():
            module = model.get_submodule(key[: -len(".weight")])
            module.weight = nn.Parameter(data, requires_grad=False)
    model.fp8_weight_scales = scales
    model.compute_dtype = dtype
    return model


def _dequantize_module(module, scale, dtype, device=None):
    p = module.weight
    saved = p.data
    p.data = FP8Weight(saved, scale).dequantize(dtype, device)
    return p, saved


@contextmanager
def dequantized_blocks(model, device=None):
    """Within this context each block's FP8 weights are 16-bit only while that block runs (on `device` when
    given, for low-VRAM streaming) and FP8 again after it: a Kontext from an fp8_scaled file is calibrated
    without ever holding its 16-bit weights whole. Weights must not be rewritten inside (max calibration only
    reads them)."""
    scales = getattr(model, "fp8_weight_scales", {})
    by_block = {}
    for name, scale in scales.items():
        block = ".".join(name.split(".")[:2])
        by_block.setdefault(block, []).append((model.get_submodule(name), scale))
    pending, hooks = {}, []

    def pre(block_name):
        def hook(block, args):
            pending[block_name] = [_dequantize_module(m, s, model.compute_dtype, device)
                                   for m, s in by_block[block_name]]
        return hook

    def post(block_name):
        def hook(block, args, output):
            for p, saved in pending.pop(block_name):
                p.data = saved
        return hook

    for block_name in by_block:
        block = model.get_submodule(block_name)
        # The post hook runs first: inside blocks_streamed_to, the FP8 weight goes back before the block leaves the GPU.
        hooks += [block.register_forward_pre_hook(pre(block_name)),
                  block.register_forward_hook(post(block_name), prepend=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for saved in pending.values():
            for p, data in saved:
                p.data = data


def dequantize_fp8_weights(model) -> None:
    """Every FP8 weight of a transformer_from_source model becomes 16-bit for good (the ONNX export stores
    16-bit weights, and recipes that rewrite weights need them writable)."""
    for name, scale in getattr(model, "fp8_weight_scales", {}).items():
        _dequantize_module(model.get_submodule(name), scale, model.compute_dtype)
    model.fp8_weight_scales = {}


def pin_fp8_weight_amax(model, scales: Mapping[str, Tensor]) -> None:
    """An FP8 source layer whose weight quantizer is FP8 per-tensor quantizes its (dequantized) weight with the
    source's own scale: the FP8 values the engine and the PyTorch backend hold are the source's, with no second
    rounding. (Calibration's max of the dequantized weights would differ from scale * 448 by the 16-bit
    rounding of the largest one, and could shift every value by one FP8 step.)"""
    from .fp8 import FP8_MAX

    for name, scale in scales.items():
        quantizer = getattr(model.get_submodule(name), "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled or quantizer.num_bits != (4, 3) or quantizer.block_sizes:
            continue
        quantizer.amax = (scale.float() * FP8_MAX).to(quantizer.amax.device).reshape(quantizer.amax.shape)
