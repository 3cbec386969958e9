"""Recipe files: the shipped ones parse; broken ones fail naming the file and the field, before calibration."""
import json
import sys

import pytest
from quant_helpers import tiny_model

from engines.onnx_export import NVFP4_EXPORTER, ExportDependencyMissing, check_export_dependencies
from engines.recipes import RECIPE_DIR, RecipeError, available_recipes, load_recipe


def test_shipped_recipes():
    assert {"fp8", "nvfp4", "svdquant_nvfp4"} <= set(available_recipes())
    fp8, nvfp4, svd = (load_recipe(n) for n in ("fp8", "nvfp4", "svdquant_nvfp4"))
    assert fp8.gemm == {"weights": "fp8_per_tensor", "activations": "fp8_per_tensor"}
    assert fp8.attention == {"q": "fp8_per_tensor", "k": "fp8_per_tensor", "v": "fp8_per_tensor",
                             "softmax_output": "fp8_unit_range"}
    assert nvfp4.gemm["weights"] == "nvfp4_block16" and nvfp4.attention["q"] == "fp8_per_block32_dynamic"
    assert nvfp4.attention["v"] == "fp8_per_tensor"  # BMM2 stays FP8 per-tensor
    assert svd.algorithm == {"method": "svdquant", "lowrank": 32}
    for r in (fp8, nvfp4, svd):
        layers = {p for p, _ in r.keep_16bit}
        assert layers == {"img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*"}
        assert all(len(why) > 20 for _, why in r.keep_16bit)
    assert not fp8.needs_cuda and nvfp4.needs_cuda and svd.rewrites_weights and not fp8.rewrites_weights


def test_attention_can_be_turned_off():
    assert load_recipe("fp8", attention=False).attention is None


def test_modelopt_config_puts_disable_all_first_and_no_foreign_defaults():
    model, _ = tiny_model()
    entries = load_recipe("fp8").modelopt_config(model)["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    assert not any("proj_out" in e["quantizer_name"] for e in entries)


def broken(tmp_path, change):
    data = json.loads((RECIPE_DIR / "fp8.json").read_text())
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d["gemm"].update(weights="fp6_magic"), r"broken.json: field 'gemm.weights' names unknown format 'fp6_magic'"),
    (lambda d: d["attention"].pop("softmax_output"), r"broken.json: missing field 'attention.softmax_output'"),
    (lambda d: d.pop("keep_16bit"), r"broken.json: missing field 'keep_16bit'"),
    (lambda d: d["keep_16bit"][0].pop("why"), r"broken.json: missing field 'keep_16bit\[0\].why'"),
    (lambda d: d.update(format="other/2"), r"broken.json: field 'format' must be"),
    (lambda d: d["algorithm"].update(method="gptq"), r"broken.json: field 'algorithm.method' names unknown algorithm"),
    (lambda d: d.update(min_compute_capability="new"), r"broken.json: field 'min_compute_capability' must look like"),
    (lambda d: d.update(gemm_overrides=[{"layers": "double_blocks.*.img_mlp.*", "weights": "fp8_per_tensor",
                                         "activations": "int3", "why": "x"}]),
     r"broken.json: field 'gemm_overrides\[0\].activations' names unknown format 'int3'"),
])
def test_broken_recipe_names_file_and_field(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(broken(tmp_path, change))


def test_pattern_matching_no_layer_fails_before_calibration(tmp_path):
    recipe = load_recipe(broken(tmp_path, lambda d: d["keep_16bit"].append({"layers": "proj_out", "why": "x" * 30})))
    model, _ = tiny_model()
    with pytest.raises(RecipeError, match=r"broken.json: keep_16bit layers 'proj_out' matches no Linear"):
        recipe.modelopt_config(model)


def test_gemm_overrides_put_the_named_layers_in_their_own_format_after_the_default(tmp_path):
    """Mixed precision: the nvfp4 recipe keeps the double blocks' image stream in FP8."""
    model, _ = tiny_model()
    recipe = load_recipe("nvfp4")
    assert {p for p, *_ in recipe.gemm_overrides} == {"double_blocks.*.img_attn.*", "double_blocks.*.img_mlp.*"}
    entries = load_recipe("nvfp4").modelopt_config(model)["quant_cfg"]
    names = [e["quantizer_name"] for e in entries]
    default, override = names.index("*input_quantizer"), names.index("double_blocks.*.img_mlp.*.input_quantizer")
    assert default < override  # ModelOpt applies entries in order: the override must come later
    assert entries[override]["cfg"]["num_bits"] == [4, 3] and entries[default]["cfg"]["num_bits"] == [2, 1]
    assert '"gemm_overrides"' in recipe.to_json()
    recipe = load_recipe(broken(tmp_path, lambda d: d.update(gemm_overrides=[
        {"layers": "double_blocks.*.img_norm", "weights": "fp8_per_tensor", "activations": "fp8_per_tensor", "why": "x"}])))
    with pytest.raises(RecipeError, match=r"gemm_overrides layers 'double_blocks.\*.img_norm' matches no Linear"):
        recipe.modelopt_config(model)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match=r"recipe: expected one of \[.*'fp8'.*\] or a .json path, got 'fp9'"):
        load_recipe("fp9")


def test_unexportable_attention_is_refused_before_any_work():
    load_recipe("fp8").check_exportable()
    load_recipe("nvfp4", attention=False).check_exportable()
    with pytest.raises(RecipeError, match=r"recipe nvfp4: attention with fp8_per_block32_dynamic Q/K has no TensorRT export"):
        load_recipe("nvfp4").check_exportable()


def test_only_recipes_with_block_quantized_weights_need_the_nvfp4_exporter(tmp_path, monkeypatch):
    nvfp4_linear2 = {"layers": "single_blocks.*.linear2", "weights": "nvfp4_block16", "activations": "nvfp4_block16",
                     "why": "x"}
    fp8_with_one_nvfp4_layer = load_recipe(broken(tmp_path, lambda d: d.update(name="fp8_nvfp4_linear2",
                                                                                gemm_overrides=[nvfp4_linear2])))
    assert not load_recipe("fp8").exports_block_quantized_weights
    assert fp8_with_one_nvfp4_layer.exports_block_quantized_weights
    assert load_recipe("nvfp4").exports_block_quantized_weights
    assert load_recipe("svdquant_nvfp4").exports_block_quantized_weights

    monkeypatch.setitem(sys.modules, NVFP4_EXPORTER, None)  # as if ModelOpt's "onnx" extra were missing
    check_export_dependencies(load_recipe("fp8"))  # FP8 exports through torch.onnx alone
    with pytest.raises(ExportDependencyMissing, match=r"recipe fp8_nvfp4_linear2: .*nvfp4_exporter.*cannot be imported"):
        check_export_dependencies(fp8_with_one_nvfp4_layer)


def test_each_recipe_has_the_tolerance_its_accuracy_target_sets():
    """Recipe.min_cosine (what the engine check holds an engine to): the targets the recipes meet at full size."""
    assert load_recipe("fp8").min_cosine == 0.99 and load_recipe("fp8", attention=False).min_cosine == 0.995
    assert load_recipe("nvfp4").min_cosine == load_recipe("svdquant_nvfp4", attention=False).min_cosine == 0.97
