"""Every Kontext file a ComfyUI user has, read as the same SourceWeights: 16-bit, fp8_scaled, comfy_quant FP8."""
import json

import pytest
import torch
from checkpoint_files import FP8, comfy_quant_state_dict, fp8_scaled_state_dict, linear_weight_keys, save
from quant_helpers import CFG

from engines import random_state_dict
from engines.model_info import describe_kontext_model
from engines.source_weights import (FP8Weight, SourceFormatError, dequantized_blocks, file_fingerprint,
                                    from_state_dict, open_checkpoint, transformer_from_source)


@pytest.fixture(scope="module")
def sd16():
    return random_state_dict(CFG, seed=3, dtype=torch.bfloat16)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_fp8_scaled_file_gives_its_fp8_weights_and_scales_untouched(sd16, tmp_path, prefix):
    fp8 = fp8_scaled_state_dict(sd16)
    path = save(fp8, tmp_path / "kontext_fp8_scaled.safetensors", prefix)
    with open_checkpoint(path) as w:
        assert w.format == "fp8_scaled" and w.name == path.name
        assert w.fp8_layers == sorted(k[: -len(".weight")] for k in linear_weight_keys(sd16))
        assert "scaled_fp8" not in w.keys and not any("scale" in k.rsplit(".", 1)[-1] for k in w.keys
                                                         if not k.endswith("norm.scale"))
        t = w.get("double_blocks.0.img_attn.qkv.weight")
        assert isinstance(t, FP8Weight) and t.data.dtype == FP8
        assert torch.equal(t.data.view(torch.uint8), fp8["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8))
        assert t.scale.item() == fp8["double_blocks.0.img_attn.qkv.scale_weight"].item()
        want = fp8["double_blocks.0.img_attn.qkv.weight"].float() * fp8["double_blocks.0.img_attn.qkv.scale_weight"]
        assert torch.equal(w.tensor("double_blocks.0.img_attn.qkv.weight", torch.float32), want)
        assert w.input_scale("double_blocks.0.img_attn.qkv").item() == pytest.approx(0.02)
        assert torch.equal(w.get("double_blocks.0.img_attn.qkv.bias"), sd16["double_blocks.0.img_attn.qkv.bias"])


@pytest.mark.parametrize("in_header", [False, True])
def test_comfy_quant_fp8_file_is_read_per_layer(sd16, tmp_path, in_header):
    layers = ["double_blocks.0.img_mlp.0", "single_blocks.1.linear2"]  # mixed precision: the rest 16-bit
    sd = comfy_quant_state_dict(sd16, layers=layers)
    metadata = None
    if in_header:  # ComfyUI also reads the layer formats from the header's _quantization_metadata
        sd = {k: v for k, v in sd.items() if not k.endswith(".comfy_quant")}
        metadata = {"_quantization_metadata": json.dumps({"layers": {k: {"format": "float8_e4m3fn"} for k in layers}})}
    with open_checkpoint(save(sd, tmp_path / "mixed.safetensors", metadata=metadata)) as w:
        assert w.format == "comfy_quant_fp8" and w.fp8_layers == sorted(layers)
        assert isinstance(w.get("single_blocks.1.linear2.weight"), FP8Weight)
        assert w.get("single_blocks.0.linear2.weight").dtype == torch.bfloat16


def test_formats_the_pack_cannot_read_are_refused_naming_file_layer_and_format(sd16, tmp_path):
    nvfp4 = comfy_quant_state_dict(sd16, fmt="nvfp4", layers=["single_blocks.0.linear1"])
    with pytest.raises(SourceFormatError, match=r"nvfp4\.safetensors: layer single_blocks\.0\.linear1 is quantized "
                                                r"as 'nvfp4'"):
        with open_checkpoint(save(nvfp4, tmp_path / "nvfp4.safetensors")):
            pass
    int8 = dict(sd16, **{"single_blocks.0.linear1.weight": torch.zeros_like(sd16["single_blocks.0.linear1.weight"],
                                                                           dtype=torch.int8)})
    with pytest.raises(SourceFormatError, match=r"int8\.safetensors: layer single_blocks\.0\.linear1\.weight is "
                                                r"stored as int8"):
        with open_checkpoint(save(int8, tmp_path / "int8.safetensors")):
            pass
    e5m2 = dict(sd16, **{"img_in.weight": sd16["img_in.weight"].to(torch.float8_e5m2)})
    with pytest.raises(SourceFormatError, match=r"e5m2\.safetensors: layer img_in\.weight is float8_e5m2"):
        with open_checkpoint(save(e5m2, tmp_path / "e5m2.safetensors")):
            pass
    gguf = tmp_path / "flux1-kontext-dev-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(SourceFormatError, match=r"flux1-kontext-dev-Q4_K_M\.gguf: a GGUF file"):
        with open_checkpoint(gguf):
            pass
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SourceFormatError, match=r"damaged\.safetensors: not a readable \.safetensors file"):
        with open_checkpoint(damaged):
            pass


def test_fingerprint_covers_every_value_and_not_the_holding_dtype(sd16, tmp_path):
    base = from_state_dict(sd16).fingerprint()
    # ComfyUI holds a bf16 file's tensors in float32 on a CPU: the same weights, the same fingerprint.
    assert from_state_dict({k: v.float() for k, v in sd16.items()}).fingerprint() == base
    with open_checkpoint(save(sd16, tmp_path / "bf16.safetensors")) as w:
        assert w.format == "bf16" and w.fingerprint() == base
    key = "single_blocks.0.linear1.weight"
    for index in (0, sd16[key].numel() // 2 + 1, sd16[key].numel() - 1):  # any element of any tensor
        changed = dict(sd16)
        flat = sd16[key].clone().reshape(-1)
        flat[index] = flat[index] * 1.5 + 0.01
        changed[key] = flat.reshape(sd16[key].shape)
        assert from_state_dict(changed).fingerprint() != base, index


def test_fp8_fingerprint_is_the_same_for_file_and_comfyui_models_of_it(sd16, tmp_path):
    fp8 = fp8_scaled_state_dict(sd16)
    path = save(fp8, tmp_path / "kontext_fp8_scaled.safetensors")
    want = file_fingerprint(path)
    # ComfyUI 0.3.64 (scaled FP8 ops on a CPU): FP8 weights with scale_weight / scale_input, the rest float32.
    comfy_0364 = {k: (v if v.dtype == FP8 or "scale_" in k else v.float()) for k, v in fp8.items() if k != "scaled_fp8"}
    assert from_state_dict(comfy_0364).fingerprint() == want
    # 0.8.0's converted form: weight_scale and a comfy_quant tensor; an input_scale of exactly 1 is dropped.
    comfy_08 = {}
    for k, v in comfy_0364.items():
        comfy_08[k.replace(".scale_weight", ".weight_scale").replace(".scale_input", ".input_scale")] = v
    assert from_state_dict(comfy_08).fingerprint() == want
    other = dict(fp8, **{"img_in.scale_weight": fp8["img_in.scale_weight"] * 2})  # one scale: other weights
    assert file_fingerprint(save(other, tmp_path / "other.safetensors")) != want


def test_fingerprint_of_a_full_width_weight_on_the_cpu():
    # A double block's qkv at full size (3072 x 9216, 28,311,552 values): a float32 index over it once rounded its
    # last index out of bounds.
    sd = {"w": torch.randn(3072, 9216).to(torch.bfloat16)}
    from engines.source_weights import SourceWeights

    weights = SourceWeights("big", "bf16", sd, sd.__getitem__, {}, {}, lambda k: sd[k].shape)
    assert len(weights.fingerprint()) == 64


def test_model_info_reports_fp8_storage_not_the_compute_dtype(sd16):
    info = describe_kontext_model(from_state_dict(fp8_scaled_state_dict(sd16)))
    assert "format fp8_scaled" in info and "float8_e4m3fn (per-tensor scaled)" in info
    sixteen = describe_kontext_model(sd16)
    def size(text):
        number, unit = text.split(" as ")[0].rsplit(" ", 2)[-2:]
        return float(number) * {"MiB": 2**20, "GiB": 2**30}[unit]

    assert "bfloat16" in sixteen and size(info) < 0.6 * size(sixteen)


@torch.no_grad()
def test_fp8_source_is_dequantized_one_block_at_a_time(sd16):
    weights = from_state_dict(fp8_scaled_state_dict(sd16))
    model = transformer_from_source(weights, torch.float32)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == FP8 and model.img_in.weight.dtype == torch.float32  # embedders dequantized up front
    seen = {}

    def record(module, args):
        seen[module] = {n: m.weight.dtype for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and n.startswith(("double_blocks", "single_blocks"))}

    from engines.tokens import example_inputs

    x = example_inputs(CFG, batch=1, target=(2, 2), references=[(2, 2)], n_txt=4, dtype=torch.float32)
    with dequantized_blocks(model):
        hooks = [b.register_forward_pre_hook(record) for b in [*model.double_blocks, *model.single_blocks]]
        out = model(**x)
    for h in hooks:
        h.remove()
    assert torch.isfinite(out).all()
    for block, dtypes in seen.items():
        name = next(n for n, m in model.named_modules() if m is block)
        mine = {n: d for n, d in dtypes.items() if n.startswith(name + ".")}
        others = {n: d for n, d in dtypes.items() if not n.startswith(name + ".")}
        assert set(mine.values()) == {torch.float32} and set(others.values()) == {FP8}, name
    assert qkv.weight.dtype == FP8  # FP8 again after the context
    reference = transformer_from_source(weights, torch.float32)
    from engines.source_weights import dequantize_fp8_weights

    dequantize_fp8_weights(reference)
    assert torch.equal(reference(**x), out)
