"""ComfyUI's fp8_scaled Kontext, loaded by ComfyUI's own UNETLoader, as a source for the pack's nodes.

A one-block full-width Kontext (ComfyUI's Flux detection fixes width 3072 and 24 heads) written in ComfyUI's
fp8_scaled layout: ComfyUI 0.3.64 runs it through its scaled FP8 ops, 0.8.0 converts it to comfy_quant
QuantizedTensor weights. Build Engine builds a real TensorRT-RTX engine from it (for an RTX target, on this CPU),
Load Quantized Model's PyTorch backend samples like ComfyUI's own sampling of that MODEL, and a checkpoint with
other weights is refused. Runs with a ComfyUI checkout (COMFYUI_PATH), skips with the reason otherwise.
"""
import json
import sys

import pytest
import torch
from checkpoint_files import fp8_scaled_state_dict, save

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, sample_full_width
from engines import random_state_dict
from engines.config import KontextConfig

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("tensorrt_rtx")
FULL_WIDTH = KontextConfig(depth=1, depth_single_blocks=1)  # 0.48 B parameters
FILE = "kontext_fp8_scaled.safetensors"


class FullWidthClip:  # FLUX's text encoders' output shapes (T5-XXL 4096 wide, CLIP-L pooled 768)
    def tokenize(self, text):
        return {"prompt": text}

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(len(tokens["prompt"]))
        return [[torch.randn(1, 16, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]


class FluxLikeVae:
    def encode(self, pixels):  # [1, H, W, 3] in 0..1 -> [1, 16, H/8, W/8]
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import_comfyui()
    import folder_paths

    tmp = tmp_path_factory.mktemp("fp8_sources")
    (tmp / "diffusion_models").mkdir()
    fp8 = fp8_scaled_state_dict(random_state_dict(FULL_WIDTH, seed=7, dtype=torch.bfloat16))
    save(fp8, tmp / "diffusion_models" / FILE)
    other = dict(fp8, **{"single_blocks.0.linear2.scale_weight": fp8["single_blocks.0.linear2.scale_weight"] * 1.01})
    save(other, tmp / "diffusion_models" / "kontext_fp8_scaled_other.safetensors")
    del fp8, other
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models")}
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(tmp / "tensorrt")], {".engine", ".plan"})
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp / "diffusion_models")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    pack = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    yield pack, tmp
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v
    folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def original(comfy):
    import nodes

    return nodes.UNETLoader().load_unet(FILE, "default")[0]  # ComfyUI's own loader and ops


@pytest.fixture(scope="module")
def built(comfy, original):
    pack, tmp = comfy
    node = pack["KontextTRT_BuildEngine"]
    module = sys.modules[node.__module__]
    saved, module.gpu_compute_capability = module.gpu_compute_capability, lambda: (8, 9)  # an RTX target, on this CPU
    try:
        engine, state = node.execute(model=original, clip=FullWidthClip(), vae=FluxLikeVae(), recipe="fp8",
                                     quantize_attention=True, profile="kontext_1ref", custom_min_side=512,
                                     custom_max_side=1568, calibration_set="", steps_per_sample=1, max_samples=2,
                                     keep_onnx=False).result
    finally:
        module.gpu_compute_capability = saved
    return engine, json.loads((tmp / "tensorrt" / engine).with_suffix(".json").read_text())


def test_model_info_names_the_fp8_format(comfy, original):
    pack, _ = comfy
    info = pack["KontextTRT_ModelInfo"].execute(original).result[0]
    assert "float8_e4m3fn (per-tensor scaled)" in info and "23 FP8 layers" in info, info
    assert "format fp8_scaled" in info or "format comfy_quant_fp8" in info, info


def test_build_engine_records_the_fp8_scaled_file_it_was_built_from(comfy, built):
    from engines.source_weights import file_fingerprint

    _, tmp = comfy
    engine, meta = built
    assert (tmp / "tensorrt" / engine).stat().st_size > 100_000
    assert meta["source"]["name"] == FILE and meta["source"]["format"] == "fp8_scaled"
    assert meta["model_fingerprint"] == meta["source"]["fingerprint"] == file_fingerprint(tmp / "diffusion_models" / FILE)




def test_pytorch_backend_samples_like_comfyuis_own_fp8_scaled_model(comfy, original, built):
    from engines.quantize import output_error

    pack, _ = comfy
    engine, _ = built
    loaded = pack["KontextTRT_LoadQuantized"].execute(engine, "pytorch", "(engine's source)", compile=False,
                                                      cuda_graph=False).result[0]
    want, got = sample_full_width(original), sample_full_width(loaded)
    cos, rel = output_error(want, got)
    # The same FP8 weights; the pack also runs activations and attention in FP8 (ComfyUI's CPU path computes them in
    # 16-bit) and, on 0.3.64, ComfyUI rounds the biases to FP8. The fp8 recipe's bound against a 16-bit model.
    print(f"fp8_scaled, pack's backend against ComfyUI's own sampling: cosine {cos:.5f}, relative L2 {rel:.4f}")
    assert cos > 0.99 and rel < 0.15, (cos, rel)


def test_a_checkpoint_with_other_weights_is_refused_naming_both(comfy, built):
    pack, _ = comfy
    engine, _ = built
    with pytest.raises(ValueError, match=r"checkpoint kontext_fp8_scaled_other\.safetensors: its weights are not those "
                                         rf"engine {engine} was calibrated from \({FILE}, fp8_scaled\)"):
        pack["KontextTRT_LoadQuantized"].execute(engine, "pytorch", "kontext_fp8_scaled_other.safetensors",
                                                 compile=False, cuda_graph=False)
