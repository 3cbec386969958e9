"""The build node inside ComfyUI: a tiny Kontext MODEL (a real ModelPatcher) -> a real TensorRT-RTX engine.

CLIP and VAE are stand-ins with FLUX's interfaces and output shapes (ComfyUI cannot build tiny
FLUX text encoders or VAE); everything else is ComfyUI's: the MODEL, latent processing, folder_paths,
progress bar and interrupt.
"""
import sys

import pytest
import torch

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, tiny_comfy_kontext
from engines import random_state_dict, tiny_config

pytest.importorskip("tensorrt_rtx")
CFG = tiny_config()


class FluxLikeClip:
    def tokenize(self, text):
        return {"prompt": text}

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(len(tokens["prompt"]))
        return [[torch.randn(1, 256, CFG.context_in_dim, generator=g), {"pooled_output": torch.randn(1, CFG.vec_in_dim, generator=g)}]]


class FluxLikeVae:
    def encode(self, pixels):  # [1, H, W, 3] in 0..1 -> [1, 16, H/8, W/8]
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x] * 5 + [x[:, :1]], dim=1) * 2 - 1


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    import_comfyui()
    nodes = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    return nodes["KontextTRT_BuildEngine"]


@pytest.fixture
def setup(node, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "tensorrt", ([str(tmp_path / "tensorrt")], {".engine", ".plan"}))
    module = sys.modules[node.__module__]
    monkeypatch.setattr(module, "gpu_compute_capability", lambda: (8, 9))  # build for Ada, on this CPU
    model = tiny_comfy_kontext(CFG, random_state_dict(CFG), dtype=torch.float16)
    return module, model, tmp_path / "tensorrt"


def run(node, model, **overrides):
    args = dict(model=model, clip=FluxLikeClip(), vae=FluxLikeVae(), recipe="fp8", quantize_attention=True,
                profile="kontext_1ref", custom_min_side=512, custom_max_side=1568, calibration_set="",
                steps_per_sample=1, max_samples=2, keep_onnx=False)
    args.update(overrides)
    return node.execute(**args).result


def test_build_node_writes_an_engine_and_reuses_it(node, setup):
    module, model, folder = setup
    engine_name, state = run(node, model)
    assert (folder / engine_name).is_file() and (folder / engine_name).with_suffix(".json").is_file()
    assert state.endswith(".calibration.safetensors")
    import folder_paths

    assert engine_name in folder_paths.get_filename_list("tensorrt")
    # Identical request: the same engine, without calibrating or building again.
    module_build = sys.modules[module.build_kontext_engine.__module__]
    original = module_build.quantize_transformer
    module_build.quantize_transformer = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recalibrated"))
    try:
        assert run(node, model)[0] == engine_name
    finally:
        module_build.quantize_transformer = original


def test_build_node_refuses_what_it_cannot_do(node, setup, monkeypatch):
    module, model, folder = setup
    with pytest.raises(ValueError, match=r"recipe nvfp4: attention with fp8_per_block32_dynamic Q/K has no TensorRT export"):
        run(node, model, recipe="nvfp4")
    with pytest.raises(RuntimeError, match=r"recipe nvfp4 needs compute capability >= 10.0 \(Blackwell\); this GPU is 8.9"):
        run(node, model, recipe="nvfp4", quantize_attention=False)

    class NotFlux:
        class model:
            diffusion_model = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="expected a Flux/Kontext transformer"):
        run(node, NotFlux())

    missing = module.import_tensorrt.__globals__["TensorRTMissing"]

    def no_trt(*a, **k):
        raise missing("no TensorRT is installed: pip install tensorrt-rtx-cu12")

    monkeypatch.setattr(module, "import_tensorrt", no_trt)
    with pytest.raises(RuntimeError, match="no TensorRT is installed"):
        run(node, model)
    assert not folder.exists() or not list(folder.glob("*.engine"))


def test_build_node_turns_interrupt_into_comfyui_interrupt(node, setup, monkeypatch):
    import comfy.model_management

    module, model, folder = setup
    monkeypatch.setattr(comfy.model_management, "processing_interrupted", lambda: True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(node, model)
    assert not list(folder.glob("*.engine")) and not list(folder.glob("*.json"))
