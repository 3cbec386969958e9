"""The calibrated Kontext as one ComfyUI-native checkpoint: layout, self-description, and the pack's loader running
it alone exactly as it runs the two files it came from."""
import json

import pytest
import torch
from quant_helpers import CFG, encoded_pairs

pytest.importorskip("modelopt.torch.quantization")

from engines import random_state_dict  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop  # noqa: E402
from engines.comfy_export import (EXPORT_FORMAT, ExportError, dequantize_nvfp4, export_comfy_checkpoint,  # noqa: E402
                                  quantize_nvfp4, write_state_from_checkpoint)
from engines.quantize import quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.runtime_torch import load_fp8_transformer  # noqa: E402
from engines.source_weights import from_state_dict, open_checkpoint  # noqa: E402
from engines.state_dict import transformer_from_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    pairs = encoded_pairs(tmp, n=3)
    sd = random_state_dict(CFG, seed=11, dtype=torch.bfloat16)
    model = transformer_from_state_dict({k: v.float() for k, v in sd.items()})
    recipe = load_recipe("fp8", attention=True)
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:2], steps=2))
    state = save_calibrated_state(model, recipe, tmp / "state.safetensors")
    out = export_comfy_checkpoint(from_state_dict(sd, name="kontext.safetensors"), state, tmp / "kontext_fp8_trt.safetensors",
                                  source={"name": "kontext.safetensors", "format": "bf16"})
    return sd, state, out, pairs[2:]


def test_export_is_comfyuis_mixed_precision_layout_and_self_describing(calibrated):
    from safetensors import safe_open

    sd, state, out, _ = calibrated
    assert not list(out.parent.glob("*.partial"))
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        layers = json.loads(meta["_quantization_metadata"])["layers"]
        qkv = "double_blocks.0.img_attn.qkv"
        assert layers[qkv] == {"format": "float8_e4m3fn"}
        assert f.get_tensor(f"{qkv}.weight").dtype == torch.float8_e4m3fn
        assert json.loads(bytes(f.get_tensor(f"{qkv}.comfy_quant").tolist())) == {"format": "float8_e4m3fn"}
        assert f.get_tensor(f"{qkv}.weight_scale").item() == f.get_tensor(f"{qkv}.scale_weight").item() > 0
        assert f.get_tensor(f"{qkv}.input_scale").item() == f.get_tensor(f"{qkv}.scale_input").item() > 0
        # Weight-only modulation: no input scale, and ComfyUI told to keep its activations 16-bit.
        assert layers["double_blocks.0.img_mod.lin"] == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
        assert "double_blocks.0.img_mod.lin.input_scale" not in keys
        # The recipe's 16-bit layers in the source's dtype; ComfyUI 0.3.64's marker.
        assert "img_in" not in layers and f.get_tensor("img_in.weight").dtype == torch.bfloat16
        assert "scaled_fp8" in keys
        pack = json.loads(meta["kontext_trt"])
        assert meta["format"] == pack["format"] == EXPORT_FORMAT and pack["recipe"]["name"] == "fp8"
        assert pack["kontext_config"] == CFG.to_dict() and pack["source"]["name"] == "kontext.safetensors"
        assert "double_blocks.0.attention.q_bmm_quantizer._amax" in pack["amax"]  # FP8 attention's scales travel too


@torch.no_grad()
def test_the_file_alone_runs_exactly_as_the_two_files(calibrated):
    from engines.accuracy import step_outputs

    sd, state, out, held = calibrated
    two_files = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    with open_checkpoint(out) as weights:
        assert weights.format == "comfy_quant_fp8"
        one_file = load_fp8_transformer(weights, out, dtype=torch.float32)
    a, b = step_outputs(two_files, held, (0.9, 0.3)), step_outputs(one_file, held, (0.9, 0.3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for (name, x), y in zip(two_files.state_dict().items(), one_file.state_dict().values()):
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y), name


def test_embedded_state_is_the_calibrated_state(calibrated, tmp_path):
    from safetensors.torch import load_file

    _, state, out, _ = calibrated
    again = load_file(str(write_state_from_checkpoint(out, tmp_path / "again.safetensors")))
    want = {k: v for k, v in load_file(str(state)).items() if k.endswith("._amax")}
    assert set(again) == set(want) and all(torch.equal(again[k], want[k]) for k in want)


def test_svdquant_states_are_refused(calibrated, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sd, state, _, _ = calibrated
    with safe_open(str(state), framework="pt") as f:
        meta = dict(f.metadata())
    svd = load_recipe("svdquant_nvfp4", attention=False)
    meta["recipe"] = svd.to_json()
    other = tmp_path / "svd.safetensors"
    save_file(load_file(str(state)), str(other), metadata=meta)
    with pytest.raises(ExportError, match="recipe svdquant_nvfp4: its low-rank branch"):
        export_comfy_checkpoint(from_state_dict(sd), other, tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("out.safetensors*"))


def test_nvfp4_quantization_round_trips_within_fp4_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[3, :16] = 0  # an all-zero block
    packed, blocked, scale_2 = quantize_nvfp4(w, w.abs().amax())
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32)
    assert blocked.dtype == torch.float8_e4m3fn and blocked.shape == (128, 4)  # cuBLAS tiles: 128 rows x 4 blocks
    back = dequantize_nvfp4(packed, blocked, scale_2, (48, 64))
    assert torch.equal(back[3, :16], torch.zeros(16))
    # E2M1 keeps 1 mantissa bit: the worst rounding is a quarter of a block's max (between 4 and 6 at 6). Random
    # bytes or a wrong tile order are off by the size of the values themselves.
    blocks_max = w.abs().reshape(48, 4, 16).amax(-1, keepdim=True)
    assert ((back - w).abs().reshape(48, 4, 16) <= blocks_max / 4 + 1e-6).all()
    assert (back - w).norm() / w.norm() < 0.12


def test_command_line_export_writes_the_same_file(calibrated, tmp_path):
    import sys

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))
    from export_checkpoint import main

    sd, state, out, _ = calibrated
    source = save_file(sd, str(tmp_path / "kontext.safetensors")) or tmp_path / "kontext.safetensors"
    assert main(["--checkpoint", str(source), "--state", str(state), "--out", str(tmp_path / "cli.safetensors")]) == 0
    a, b = load_file(str(out)), load_file(str(tmp_path / "cli.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
                                    for k in a)


def test_an_engine_builds_from_the_exported_checkpoint_without_calibrating(calibrated, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds engines on the CPU")
    import engines.build as build

    from engines.engine_store import EngineStore
    from engines.shape_profiles import named_profile
    from engines.tensorrt_build import import_tensorrt

    _, _, out, _ = calibrated
    monkeypatch.setattr(build, "calibration_forward_loop",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated again")))
    with open_checkpoint(out) as weights:
        with pytest.raises(ValueError, match=r"calibrated with recipe fp8 and FP8 attention, not the fp8 asked for"):
            build.build_kontext_engine(weights, load_recipe("fp8", attention=False), [named_profile("kontext_1ref")],
                                       [], 0, EngineStore(tmp_path / "trt"), calibrated_from=out,
                                       compute_capability=(8, 9), trt=import_tensorrt("tensorrt_rtx"))
        result = build.build_kontext_engine(weights, load_recipe("fp8", attention=True), [named_profile("kontext_1ref")],
                                            [], 0, EngineStore(tmp_path / "trt"), calibrated_from=out,
                                            compute_capability=(8, 9), trt=import_tensorrt("tensorrt_rtx"))
    assert result.engine.is_file() and "calibrate (resumed from saved state)" in result.stages
