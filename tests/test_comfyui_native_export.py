"""The exported ComfyUI-native checkpoint in stock ComfyUI: its own UNETLoader loads it (0.8.0: mixed-precision ops;
0.3.64: scaled FP8 ops), and its sampling matches the pack's loader running the same file alone (attention 16-bit on
both: calibrated without attention quantization) and the original 16-bit model within the fp8 recipe's error.

A one-block full-width Kontext, since ComfyUI's Flux detection fixes width 3072 and 24 heads. Runs with a ComfyUI
checkout (COMFYUI_PATH), skips with the reason otherwise.
"""
import pytest
import torch

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, sample_full_width
from engines import random_state_dict
from engines.config import KontextConfig

pytest.importorskip("modelopt.torch.quantization")
FULL_WIDTH = KontextConfig(depth=1, depth_single_blocks=1)
SOURCE, EXPORTED = "kontext_bf16.safetensors", "kontext_fp8_trt.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import_comfyui()
    import folder_paths
    from safetensors.torch import save_file

    from engines.build import StageRecorder, calibrate_or_resume
    from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set
    from engines.comfy_export import export_comfy_checkpoint
    from engines.recipes import load_recipe
    from engines.source_weights import open_checkpoint, transformer_from_source

    tmp = tmp_path_factory.mktemp("native_export")
    models = tmp / "diffusion_models"
    models.mkdir()
    save_file(random_state_dict(FULL_WIDTH, seed=9, dtype=torch.bfloat16), str(models / SOURCE))
    encode = StandInEncoder(FULL_WIDTH, n_txt=16)
    pairs = [encode(p, 64) for p in read_calibration_set(write_default_calibration_set(tmp / "calib", size=64))[:2]]
    with open_checkpoint(models / SOURCE) as weights:
        model = transformer_from_source(weights, torch.float32)
        state = tmp / "state.safetensors"
        calibrate_or_resume(model, load_recipe("fp8", attention=False), pairs, 2, state, StageRecorder(False))
        del model
        export_comfy_checkpoint(weights, state, models / EXPORTED, source=weights.describe())
    saved = folder_paths.folder_names_and_paths.get("diffusion_models")
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(models)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    pack = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    yield pack, models
    folder_paths.folder_names_and_paths["diffusion_models"] = saved
    folder_paths.filename_list_cache.clear()


def layers_of(path) -> set:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(json.loads(f.metadata()["_quantization_metadata"])["layers"])




def test_stock_comfyui_runs_the_exported_checkpoint_like_the_pack(files):
    import nodes

    from engines.quantize import output_error

    pack, _ = files
    stock = nodes.UNETLoader().load_unet(EXPORTED, "default")[0]
    linears = [m for m in stock.model.diffusion_model.modules() if type(m).__name__ == "Linear"]
    mixed = [m for m in linears if getattr(m, "quant_format", None) == "float8_e4m3fn"]  # 0.8.0's mixed precision
    scaled = [m for m in linears if getattr(m, "scale_weight", None) is not None]  # 0.3.64's scaled FP8 ops
    print(f"stock ComfyUI: {len(mixed)} mixed-precision FP8 Linears, {len(scaled)} scaled-FP8 Linears of {len(linears)}")
    quantized = layers_of(files[1] / EXPORTED)
    assert len(quantized) == 13  # the fp8 recipe's layers of one double and one single block
    assert {n for n, m in stock.model.diffusion_model.named_modules() if m in mixed} == quantized or (
        not mixed and len(scaled) == len(linears))
    ours = pack["KontextTRT_LoadQuantized"].execute("(none: an exported checkpoint alone)", "pytorch", EXPORTED,
                                                   compile=False, cuda_graph=False).result[0]
    original = nodes.UNETLoader().load_unet(SOURCE, "default")[0]
    want, stock_out, ours_out = sample_full_width(original), sample_full_width(stock), sample_full_width(ours)
    cos_pack, rel_pack = output_error(stock_out, ours_out)
    cos_16, rel_16 = output_error(want, ours_out)
    cos_stock_16, rel_stock_16 = output_error(want, stock_out)
    print(f"pack vs stock on the exported file: cosine {cos_pack:.5f}, rel L2 {rel_pack:.4f}; pack vs 16-bit: "
          f"{cos_16:.5f}, {rel_16:.4f}; stock vs 16-bit: {cos_stock_16:.5f}, {rel_stock_16:.4f}")
    assert cos_pack > 0.99 and rel_pack < 0.15, (cos_pack, rel_pack)  # the fp8 recipe's bound
    assert cos_16 > 0.99 and rel_16 < 0.15, (cos_16, rel_16)
    assert rel_16 > 1e-4  # FP8 really ran


def test_loader_refuses_a_plain_checkpoint_alone(files):
    pack, _ = files
    with pytest.raises(ValueError, match=rf"checkpoint {SOURCE}: not written by Export ComfyUI Checkpoint"):
        pack["KontextTRT_LoadQuantized"].execute("(none: an exported checkpoint alone)", "pytorch", SOURCE,
                                                 compile=False, cuda_graph=False)


def test_nvfp4_layout_is_what_comfyuis_own_nvfp4_loading_reads():
    """Checked on the CPU as far as it runs there: ComfyUI 0.8's mixed-precision Linear loads the exported NVFP4
    tensors and comfy-kitchen dequantizes them to the values the pack quantized. NVFP4 GEMMs themselves need a
    Blackwell GPU (compute capability 10.0 / 12.x) and are not run here."""
    import json

    import_comfyui()
    import comfy.ops

    from engines.comfy_export import dequantize_nvfp4, quantize_nvfp4

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no mixed-precision (NVFP4) checkpoints; 0.8.0 has them")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 3072, generator=g) * 0.02
    packed, blocked, scale_2 = quantize_nvfp4(w, w.abs().amax())
    layer = comfy.ops.mixed_precision_ops(compute_dtype=torch.float32).Linear(3072, 256, bias=False)
    conf = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    layer.load_state_dict({"weight": packed, "weight_scale": blocked, "weight_scale_2": scale_2, "comfy_quant": conf},
                          strict=False)
    assert layer.quant_format == "nvfp4"
    theirs = layer.weight.dequantize().float()
    ours = dequantize_nvfp4(packed, blocked, scale_2, (256, 3072))
    assert torch.equal(theirs, ours)
    assert (theirs - w).norm() / w.norm() < 0.12  # and both are the weight, to FP4's precision
