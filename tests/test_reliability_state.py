"""Damaged calibrated states, checkpoints and calibration data. A build that finds a damaged or mismatched calibrated
state says so and calibrates again; the PyTorch backend refuses one naming the file, the quantizer and the value; a
damaged calibration set, checkpoint or model is named before calibration starts; a calibration set edited in place
is a new request.

States come from finished real builds (reliability_fixtures.built_store); rebuilds calibrate for real, with
stand-ins for the ONNX export and TensorRT's builder (what is tested is what the build decides and keeps).
"""
import dataclasses
import json
import logging
import math
import re
import shutil

import pytest
import torch

import fault_children
from engines.calibrated_state import CalibratedStateError
from engines.calibration import CalibrationSetError, read_calibration_set, write_default_calibration_set
from engines.runtime_torch import BackendError, load_fp8_transformer

HURT = "double_blocks.0.img_attn.qkv.input_quantizer"


def rewrite_state(path, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def set_amax(value):
    return lambda path, other: rewrite_state(path, lambda t, m: t.__setitem__(HURT + "._amax", torch.tensor(value)))


def state_of(engine):
    return engine.with_name(engine.stem + ".calibration.safetensors")


# (damage(state, the other request's state), what the refusal names)
STATE_DAMAGE = {
    "cut_short": (lambda p, o: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), "not a readable calibrated state"),
    "random_bytes": (lambda p, o: p.write_bytes(bytes(range(256)) * (p.stat().st_size // 256)),
                     "not a readable calibrated state"),
    "nan_amax": (set_amax(math.nan), f"quantizer {HURT}: expected a finite, positive amax, got nan"),
    "inf_amax": (set_amax(math.inf), f"quantizer {HURT}: expected a finite, positive amax, got inf"),
    "zero_amax": (set_amax(0.0), f"quantizer {HURT}: expected a finite, positive amax, got 0.0"),
    "negative_amax": (set_amax(-3.0), f"quantizer {HURT}: expected a finite, positive amax, got -3.0"),
    "missing_input_amax": (lambda p, o: rewrite_state(p, lambda t, m: t.pop(HURT + "._amax")),
                           f"got none for 1: ['{HURT}']"),
    "garbled_recipe_metadata": (lambda p, o: rewrite_state(p, lambda t, m: m.update(recipe="{not json")),
                                "metadata field 'recipe' is missing or not a recipe"),
}
BUILD_ONLY_DAMAGE = {
    # a state calibrated without attention where an attention build resumes
    "calibrated_without_attention": (lambda p, o: shutil.copyfile(o, p),
                                     "expected a state calibrated with recipe fp8 with attention quantized, got one "
                                     "calibrated with recipe fp8 with attention in 16-bit"),
}


@pytest.mark.parametrize("damage", {**STATE_DAMAGE, **BUILD_ONLY_DAMAGE})
def test_a_build_finding_a_damaged_calibrated_state_calibrates_again(damage, store_copy, pairs_dir, standin_export,
                                                                     standin_builder, caplog):
    root, engine, other = store_copy
    state = state_of(engine)
    engine.unlink()
    engine.with_suffix(".json").unlink()  # the build was cancelled after calibrating: it resumes from the state
    hurt, named = {**STATE_DAMAGE, **BUILD_ONLY_DAMAGE}[damage]
    hurt(state, state_of(other))
    with caplog.at_level(logging.WARNING):
        result = fault_children.build(root, pairs_dir)
    assert "calibrate" in result.stages and "calibrate (resumed from saved state)" not in result.stages
    assert state.name in caplog.text and named in caplog.text
    from engines.calibrated_state import check_calibrated_state
    from engines.recipes import load_recipe

    check_calibrated_state(state, load_recipe("fp8"))  # the state written in its place is whole, of this recipe
    assert json.loads(result.engine.with_suffix(".json").read_text())["recipe"]["attention"] is not None


@pytest.mark.parametrize("damage", STATE_DAMAGE)
def test_the_pytorch_backend_refuses_a_damaged_state_naming_file_quantizer_and_value(damage, store_copy, pairs_dir):
    _, engine, other = store_copy
    state = state_of(engine)
    hurt, named = STATE_DAMAGE[damage]
    hurt(state, state_of(other))
    sd, _ = fault_children.tiny_inputs(str(pairs_dir))
    with pytest.raises(CalibratedStateError, match=rf"{re.escape(str(state))}: .*{re.escape(named)}"):
        load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)


def test_the_pytorch_backend_names_a_tensor_the_checkpoint_lacks(built_store, pairs_dir):
    _, engine, _ = built_store
    sd, _ = fault_children.tiny_inputs(str(pairs_dir))
    damaged = {k: v for k, v in sd.items() if k != "single_blocks.1.linear2.weight"}
    with pytest.raises(BackendError, match=r"checkpoint: reading tensor single_blocks.1.linear2.weight failed \(KeyError"
                                           r".*expected the Kontext checkpoint the engine was built from"):
        load_fp8_transformer(damaged.__getitem__, state_of(engine), dtype=torch.float32)


def test_nan_in_the_model_is_named_before_calibration(pairs_dir, tmp_path, monkeypatch, refuse_calibration):
    sd, pairs = fault_children.tiny_inputs(str(pairs_dir))
    damaged = dict(sd)
    weight = damaged["single_blocks.0.linear1.weight"].clone()
    weight[3, 5] = math.nan
    damaged["single_blocks.0.linear1.weight"] = weight
    monkeypatch.setattr(fault_children, "tiny_inputs", lambda _: (damaged, pairs))
    with pytest.raises(ValueError, match=r"model: weight single_blocks.0.linear1.weight: expected finite values, "
                                         r"got 1 NaN or infinite") as refused:
        fault_children.build(tmp_path / "tensorrt", pairs_dir)
    assert type(refused.value).__name__ == "BuildInputError"


@pytest.mark.parametrize("field, value, named", [
    ("txt", math.nan, r"txt: expected finite values, got 1 NaN or infinite"),
    ("reference", math.inf, r"reference: expected finite values, got 1 NaN or infinite"),
    ("txt", "empty", r"txt: expected a non-empty tensor of 3 dims, batch 1, got \(1, 0, 48\)"),
])
def test_a_damaged_calibration_pair_is_named_before_calibration(field, value, named, pairs_dir, tmp_path,
                                                                refuse_calibration):
    _, pairs = fault_children.tiny_inputs(str(pairs_dir))
    t = getattr(pairs[1], field)
    if value == "empty":
        t = t[:, :0]
    else:
        t = t.clone()
        t[0, 2, 3] = value
    damaged = [pairs[0], dataclasses.replace(pairs[1], **{field: t})]
    with pytest.raises(CalibrationSetError, match=rf"calibration pair 1 \(01_house_day\): {named}"):
        fault_children.build(tmp_path / "tensorrt", pairs_dir, pairs=damaged)


def test_a_calibration_set_edited_in_place_is_a_new_request(tmp_path, pairs_dir, standin_export, standin_builder):
    from engines.calibration import StandInEncoder
    from quant_helpers import CFG, SIZE

    folder = write_default_calibration_set(tmp_path / "calib", size=SIZE)
    encode = StandInEncoder(CFG, n_txt=16)

    def encoded():
        return [encode(p, SIZE) for p in read_calibration_set(folder)[:2]]

    root = tmp_path / "tensorrt"
    first = fault_children.build(root, pairs_dir, pairs=encoded(), calibration_name=str(folder))
    (folder / "00_house_day.txt").write_text("make it snow\n")  # same folder, same count, another prompt
    second = fault_children.build(root, pairs_dir, pairs=encoded(), calibration_name=str(folder))
    assert not second.cached and len(standin_builder) == 2
    assert second.engine != first.engine and "calibrate" in second.stages


def damaged_set(tmp_path, damage):
    from quant_helpers import SIZE

    folder = write_default_calibration_set(tmp_path / "calib", size=SIZE)
    image, prompt = folder / "03_street.png", folder / "03_street.txt"
    damage(image, prompt)
    return folder, image, prompt


@pytest.mark.parametrize("damage, named", [
    (lambda image, prompt: image.write_bytes(image.read_bytes()[:200]), "03_street.png: expected a readable"),
    (lambda image, prompt: image.write_bytes(b"not an image at all"), "03_street.png: expected a readable"),
    (lambda image, prompt: image.write_bytes(b""), "03_street.png: expected a readable"),
    (lambda image, prompt: prompt.write_bytes(b"\xff\xfe make it \xe9 night"), "03_street.txt: expected UTF-8 text"),
], ids=["image_cut_short", "image_not_an_image", "image_empty", "prompt_not_utf8"])
def test_a_damaged_calibration_set_names_the_file(damage, named, tmp_path):
    folder, _, _ = damaged_set(tmp_path, damage)
    with pytest.raises(CalibrationSetError, match=re.escape(named)):
        read_calibration_set(folder)


def test_a_calibration_list_entry_without_an_image_path_is_named(tmp_path):
    listing = tmp_path / "set.json"
    listing.write_text(json.dumps([{"image": 5, "prompt": "make it night"}]))
    with pytest.raises(CalibrationSetError, match=r"set.json: entry 0 needs 'image' \(a path\) and 'prompt'"):
        read_calibration_set(listing)


@pytest.mark.parametrize("attention", [True, False])
def test_the_quantizers_a_state_must_carry_are_those_modelopt_calibrates(attention):
    """check_calibrated_state reads the required amax list off the recipe without ModelOpt; it must be ModelOpt's."""
    from engines.quantize import quant_report, quantize_transformer
    from engines.recipes import load_recipe
    from quant_helpers import tiny_model

    recipe = load_recipe("fp8", attention=attention)
    model, _ = tiny_model()
    expected = recipe.calibrated_quantizers(model)
    quantize_transformer(model, recipe, forward_loop=None)
    assert sorted(expected) == sorted(quant_report(model).uncalibrated)
    assert any("q_bmm_quantizer" in q for q in expected) == attention
