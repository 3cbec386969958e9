"""Quantization recipes: the files in quant_configs/, checked, and turned into a ModelOpt config.

A recipe names formats per role (GEMM weights and activations; attention Q, K, V and softmax
output), the layers that take another format (gemm_overrides: mixed precision; weight_only) and the
layers that stay in 16-bit, each with the reason. Everything is checked before anything
is calibrated: an unknown format, a missing field, or a 16-bit pattern that matches no layer of the
model raises RecipeError naming the file and the field.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .quant_formats import CUDA_ONLY_FORMATS, FORMATS

RECIPE_DIR = Path(__file__).resolve().parent.parent / "quant_configs"
RECIPE_FORMAT = "kontext-trt-recipe/1"
# ModelOpt calibration algorithms a recipe may name, with the options each takes: (type, range check, what is expected).
ALGORITHMS = {"max": {}, "mse": {"fp8_scale_sweep": (bool, None, "true or false")},
              "svdquant": {"lowrank": (int, lambda v: 1 <= v <= 4096, "a rank from 1 to 4096")}}
# A recipe's name becomes part of its engines' file names.
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
GEMM_ROLES = ("weights", "activations")
ATTENTION_ROLES = ("q", "k", "v", "softmax_output")
# Our Attention module's quantizers carry ModelOpt's own names for them (its diffusers plugin uses
# the same), so ModelOpt's tools and exporters recognise them.
ATTENTION_QUANTIZERS = {"q": "q_bmm_quantizer", "k": "k_bmm_quantizer", "v": "v_bmm_quantizer",
                        "softmax_output": "softmax_quantizer"}


class RecipeError(ValueError):
    """A recipe file that cannot be used as written."""


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # the file it came from, for messages
    description: str
    min_compute_capability: tuple[int, int]
    algorithm: dict
    gemm: dict[str, str]
    attention: dict[str, str] | None  # None: attention stays 16-bit
    keep_16bit: tuple[tuple[str, str], ...]  # (module-name pattern, why)
    weight_only: tuple[tuple[str, str, str], ...] = ()  # (pattern, weight format, why): inputs stay 16-bit
    # (pattern, weight format, activation format, why): layers in another format than `gemm` (mixed precision)
    gemm_overrides: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def needs_cuda(self) -> bool:
        """ModelOpt fake-quantizes some formats only on CUDA (NVFP4, dynamic per-block FP8)."""
        used = (set(self.gemm.values()) | set((self.attention or {}).values())
                | {f for _, w, a, _ in self.gemm_overrides for f in (w, a)})
        return bool(used & CUDA_ONLY_FORMATS)

    def check_exportable(self) -> None:
        """TensorRT's fused FP8 attention takes per-tensor FP8 Q, K and V; ModelOpt exports nothing else."""
        if self.attention and any(self.attention[r] != "fp8_per_tensor" for r in ("q", "k", "v")):
            raise RecipeError(f"recipe {self.name}: attention with {self.attention['q']} Q/K has no TensorRT export in "
                              "ModelOpt 0.47 (its fused FP8 attention takes per-tensor scales); build this recipe with "
                              "attention quantization off")

    @property
    def exports_block_quantized_weights(self) -> bool:
        """Weights in a per-block format (NVFP4) leave through ModelOpt's NVFP4 ONNX exporter (onnx_export)."""
        weights = ({self.gemm["weights"]} | {f for _, f, _ in self.weight_only}
                   | {w for _, w, _, _ in self.gemm_overrides})
        return any("block_sizes" in FORMATS[f] for f in weights)

    @property
    def min_cosine(self) -> float:
        """The recipe's tolerance: the output cosine against the 16-bit model it is held to (worst pair, any sigma),
        met at full size (README, "Accuracy against BF16"): NVFP4 GEMMs 0.97; FP8 GEMMs 0.995, or 0.99 with
        attention quantized too. Two runtimes of one calibrated recipe that disagree by more than that are not
        both computing it."""
        formats = (set(self.gemm.values()) | {f for _, w, a, _ in self.gemm_overrides for f in (w, a)}
                   | {f for _, f, _ in self.weight_only})
        if any(f.startswith("nvfp4") for f in formats):
            return 0.97
        return 0.99 if self.attention else 0.995

    @property
    def rewrites_weights(self) -> bool:
        """SVDQuant subtracts the low-rank branch and AWQ-smooths the weights in place."""
        return self.algorithm["method"] == "svdquant"

    def to_json(self) -> str:
        return json.dumps(dict(
            format=RECIPE_FORMAT, name=self.name, description=self.description,
            min_compute_capability=".".join(map(str, self.min_compute_capability)), algorithm=self.algorithm,
            gemm=self.gemm, attention=self.attention,
            keep_16bit=[dict(layers=p, why=w) for p, w in self.keep_16bit],
            weight_only=[dict(layers=p, weights=f, why=w) for p, f, w in self.weight_only],
            gemm_overrides=[dict(layers=p, weights=wf, activations=af, why=w) for p, wf, af, w in self.gemm_overrides]),
            sort_keys=True)

    def modelopt_config(self, model: nn.Module) -> dict:
        """ModelOpt's list-form config for this model, after checking every pattern matches a Linear.

        Disable-all comes FIRST: ModelOpt applies entries in order, and a trailing catch-all would
        switch everything off again (the trap DESIGN.md records). No ModelOpt default is merged in,
        so none of its patterns for other model families ("*proj_out*") can drop a layer here.
        """
        linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for section, entries in (("keep_16bit", self.keep_16bit), ("weight_only", self.weight_only),
                                 ("gemm_overrides", self.gemm_overrides)):
            for pattern, *_ in entries:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in linear_names):
                    raise RecipeError(f"{self.source}: {section} layers {pattern!r} matches no Linear layer of the "
                                      f"model (it has e.g. {linear_names[:4]})")
        entries = [{"quantizer_name": "*", "enable": False},
                   {"quantizer_name": "*weight_quantizer", "cfg": _attrs(self.gemm["weights"])},
                   {"quantizer_name": "*input_quantizer", "cfg": _attrs(self.gemm["activations"])}]
        for role, fmt in (self.attention or {}).items():
            entries.append({"quantizer_name": f"*.{ATTENTION_QUANTIZERS[role]}", "cfg": _attrs(fmt)})
        for pattern, weights, activations, _ in self.gemm_overrides:
            entries.append({"quantizer_name": f"{pattern}.weight_quantizer", "cfg": _attrs(weights)})
            entries.append({"quantizer_name": f"{pattern}.input_quantizer", "cfg": _attrs(activations)})
        for pattern, fmt, _ in self.weight_only:
            entries.append({"quantizer_name": f"{pattern}.weight_quantizer", "cfg": _attrs(fmt)})
            entries.append({"quantizer_name": f"{pattern}.input_quantizer", "enable": False})
        for pattern, _ in self.keep_16bit:
            entries.append({"quantizer_name": f"{pattern}.*_quantizer", "enable": False})
        algorithm = copy.deepcopy(self.algorithm)
        if self.rewrites_weights:
            # SVDQuant's low-rank branch is for the NVFP4 layers; layers the recipe puts in FP8 are max-calibrated
            # (and skip its per-layer float64 SVD, the slowest part of its calibration at full size).
            algorithm["skip_layers"] = [p for p, *_ in self.gemm_overrides + self.weight_only]
        return {"quant_cfg": entries, "algorithm": algorithm}

    def calibrated_quantizers(self, model: nn.Module) -> list[str]:
        """The quantizers of `model` (full module names) that calibration gives an amax, decided from the config
        modelopt_config hands ModelOpt, applied as ModelOpt applies it (the last entry whose pattern matches a
        quantizer's name sets it): enabled, neither dynamic nor of a constant range. A saved calibrated state is
        checked against this list without ModelOpt (the PyTorch backend runs without it)."""
        from .transformer import Attention

        names = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                names += [f"{name}.weight_quantizer", f"{name}.input_quantizer"]
            elif isinstance(module, Attention):
                names += [f"{name}.{quantizer}" for quantizer in ATTENTION_QUANTIZERS.values()]
        entries = self.modelopt_config(model)["quant_cfg"]
        calibrated = []
        for quantizer in names:
            cfg = None
            for entry in entries:
                if fnmatch.fnmatchcase(quantizer, entry["quantizer_name"]):
                    cfg = None if entry.get("enable") is False else entry["cfg"]
            if cfg is not None and cfg.get("type") != "dynamic" and "constant_amax" not in cfg:
                calibrated.append(quantizer)
        return calibrated


def _attrs(fmt: str) -> dict:
    attrs = copy.deepcopy(FORMATS[fmt])
    if "block_sizes" in attrs:  # JSON-style string axis keys ("-1") -> the ints ModelOpt validates
        attrs["block_sizes"] = {int(k) if k.lstrip("-").isdigit() else k: v for k, v in attrs["block_sizes"].items()}
    return attrs


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str | Path, attention: bool = True) -> Recipe:
    """A shipped recipe by name ("fp8", "nvfp4", "svdquant_nvfp4") or a recipe file by path.

    attention=False keeps attention in 16-bit whatever the file says.
    """
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RECIPE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise RecipeError(f"recipe: expected one of {available_recipes()} or a .json path, got {str(name_or_path)!r}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not a readable JSON recipe ({e})") from e
    return parse_recipe(data, source=str(path), attention=attention)


def parse_recipe(data: dict, source: str, attention: bool = True) -> Recipe:
    def field(obj, key, kind, where=""):
        name = f"{where}{key}"
        if not isinstance(obj, dict) or key not in obj:
            raise RecipeError(f"{source}: missing field {name!r}")
        # bool is an int to Python; `lowrank: true` is not a rank
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise RecipeError(f"{source}: field {name!r} must be {getattr(kind, '__name__', kind)}, "
                              f"got {type(obj[key]).__name__}")
        return obj[key]

    def fmt(obj, role, where):
        value = field(obj, role, str, where)
        if value not in FORMATS:
            raise RecipeError(f"{source}: field '{where}{role}' names unknown format {value!r}; "
                              f"known formats: {sorted(FORMATS)}")
        return value

    if field(data, "format", str) != RECIPE_FORMAT:
        raise RecipeError(f"{source}: field 'format' must be {RECIPE_FORMAT!r}, got {data['format']!r}")
    algorithm = field(data, "algorithm", dict)
    method = field(algorithm, "method", str, "algorithm.")
    if method not in ALGORITHMS:
        raise RecipeError(f"{source}: field 'algorithm.method' names unknown algorithm {method!r}; "
                          f"known: {sorted(ALGORITHMS)}")
    extra = set(algorithm) - {"method"} - set(ALGORITHMS[method])
    if extra:
        raise RecipeError(f"{source}: field 'algorithm' has unknown keys {sorted(extra)} for {method!r}")
    for key, (kind, ok, expected) in ALGORITHMS[method].items():
        value = field(algorithm, key, kind, "algorithm.")
        if ok is not None and not ok(value):
            raise RecipeError(f"{source}: field 'algorithm.{key}' must be {expected}, got {value!r}")

    gemm_obj = field(data, "gemm", dict)
    gemm = {role: fmt(gemm_obj, role, "gemm.") for role in GEMM_ROLES}
    attention_obj = data.get("attention", None)
    if attention_obj is not None:
        attention_obj = field(data, "attention", dict)
        attention_cfg = {role: fmt(attention_obj, role, "attention.") for role in ATTENTION_ROLES}
    else:
        attention_cfg = None

    keep = tuple((field(e, "layers", str, f"keep_16bit[{i}]."), field(e, "why", str, f"keep_16bit[{i}]."))
                 for i, e in enumerate(field(data, "keep_16bit", list)))
    weight_only = tuple((field(e, "layers", str, f"weight_only[{i}]."), fmt(e, "weights", f"weight_only[{i}]."),
                         field(e, "why", str, f"weight_only[{i}]."))
                        for i, e in enumerate(field(data, "weight_only", list) if "weight_only" in data else []))
    overrides = tuple((field(e, "layers", str, f"gemm_overrides[{i}]."), fmt(e, "weights", f"gemm_overrides[{i}]."),
                       fmt(e, "activations", f"gemm_overrides[{i}]."), field(e, "why", str, f"gemm_overrides[{i}]."))
                      for i, e in enumerate(field(data, "gemm_overrides", list) if "gemm_overrides" in data else []))
    cc = field(data, "min_compute_capability", str)
    try:
        major, minor = (int(x) for x in cc.split("."))
    except ValueError:
        raise RecipeError(f"{source}: field 'min_compute_capability' must look like '8.9', got {cc!r}") from None
    name = field(data, "name", str)
    if not RECIPE_NAME.fullmatch(name):
        raise RecipeError(f"{source}: field 'name' must be letters, digits, '_' and '-' (at most 64; it names the "
                          f"engine files), got {name!r}")
    return Recipe(name=name, source=source, description=field(data, "description", str),
                  min_compute_capability=(major, minor), algorithm=dict(algorithm), gemm=gemm,
                  attention=attention_cfg if attention else None, keep_16bit=keep,
                  weight_only=weight_only, gemm_overrides=overrides)
