"""ComfyUI's official FLUX.1 Kontext [dev] template (flux_kontext_dev_basic, from the installed
comfyui-workflow-templates package: the version the running ComfyUI pins) with its UNETLoader swapped for
Load Quantized Model runs to an image through ComfyUI's own validation and executor.

The template's graph is kept as it is: its KSampler (seed, sampler, scheduler, CFG), ReferenceLatent, FluxGuidance,
ConditioningZeroOut, ImageStitch, FluxKontextImageScale, VAE encode/decode, SaveImage (and, in older versions, the
PreviewImage, LoadImageOutput and bypassed nodes; in newer ones the subgraph). Reduced only where a 2-core CPU needs:
- the diffusion model: a one-block full-width Kontext (ComfyUI's Flux detection fixes width 3072 and 24 heads) in
  ComfyUI's fp8_scaled layout, under the file name the template gives; the engine is built from it beforehand (fp8,
  a real TensorRT-RTX engine for an RTX target, built on this CPU) and Load Quantized Model runs its PyTorch backend
  (checkpoint "(engine's source)", compile and CUDA graphs off: no GPU here);
- text encoders and VAE: stand-ins with FLUX's interfaces and a full-width model's text widths (scripts/tiny_kontext);
- steps: 20 -> 2; the input image: a 120 x 80 random image the test writes where the template's image loader reads;
- image size: FluxKontextImageScale's table of preferred resolutions scaled by 1/8 (to multiples of 16), so its
  own choice of the closest aspect ratio gives 144 x 96 for a 3:2 image instead of 1248 x 832.
Skips without a ComfyUI checkout (COMFYUI_PATH) or without the comfyui-workflow-templates package; never downloads.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_files import fp8_scaled_state_dict, save

from comfyui_checkout import import_comfyui, load_pack_into_comfyui
import run_workflow  # noqa: E402  scripts/, on the path through comfyui_checkout
from engines import random_state_dict
from engines.config import KontextConfig
from tiny_kontext import StandInVae, stand_in_encoders

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("tensorrt_rtx")
FULL_WIDTH = KontextConfig(depth=1, depth_single_blocks=1)
TEMPLATE = "flux_kontext_dev_basic"
INPUT = (120, 80)  # a 3:2 image
OUTPUT = (144, 96)  # (1248, 832) / 8, floored to multiples of 16: the scaled table's 3:2 entry
STEPS = 2


def official_template() -> dict:
    """The template's UI-format JSON as the installed package ships it (0.1.x: one templates/ folder; later
    versions split into bundles reached through get_asset_path)."""
    templates = pytest.importorskip("comfyui_workflow_templates",
                                    reason="comfyui-workflow-templates (ComfyUI's template package) is not installed")
    if hasattr(templates, "get_asset_path"):
        path = Path(templates.get_asset_path(TEMPLATE, f"{TEMPLATE}.json"))
    else:
        path = Path(templates.get_templates_path()) / f"{TEMPLATE}.json"
    return json.loads(path.read_text())


class RecordingVae(StandInVae):
    """The stand-in VAE, keeping what it decoded (to check the saved file against the float image)."""

    decoded: list = []

    def decode(self, latent):
        image = super().decode(latent)
        self.decoded.append(image)
        return image


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import_comfyui()
    import folder_paths
    import nodes

    if "FluxKontextImageScale" not in nodes.NODE_CLASS_MAPPINGS:
        run_workflow.load_comfy_extras()
    tmp = tmp_path_factory.mktemp("official_template")
    for d in ("diffusion_models", "input", "output", "temp"):
        (tmp / d).mkdir()
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models")}
    dirs = folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(tmp / "tensorrt")], {".engine", ".plan"})
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp / "diffusion_models")], {".safetensors"})
    folder_paths.set_input_directory(str(tmp / "input"))
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    folder_paths.filename_list_cache.clear()
    pack = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    yield pack, tmp
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v
    folder_paths.set_input_directory(dirs[0])
    folder_paths.set_output_directory(dirs[1])
    folder_paths.set_temp_directory(dirs[2])
    folder_paths.filename_list_cache.clear()


def build_engine(tmp: Path, checkpoint: Path) -> str:
    """What Build Engine leaves in models/tensorrt, from the template's diffusion model file."""
    from engines.build import build_kontext_engine
    from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set
    from engines.engine_store import EngineStore
    from engines.recipes import load_recipe
    from engines.shape_profiles import named_profile
    from engines.source_weights import open_checkpoint
    from engines.tensorrt_build import import_tensorrt

    encode = StandInEncoder(FULL_WIDTH, n_txt=16)
    pairs = [encode(p, 128) for p in read_calibration_set(write_default_calibration_set(tmp / "calib", size=128))[:2]]
    with open_checkpoint(checkpoint) as weights:
        return build_kontext_engine(weights, load_recipe("fp8"), [named_profile("kontext_1ref")], pairs, steps=1,
                                    store=EngineStore(tmp / "tensorrt"), compute_capability=(8, 9),
                                    trt=import_tensorrt("tensorrt_rtx")).engine.name


def prepare(prompt: dict, classes: dict, engine: str, image: str) -> dict:
    """The template's API prompt with its UNETLoader swapped for Load Quantized Model, the encoders for stand-ins,
    and the reductions of the module docstring. Fails if the template lacks what the swap needs."""
    by_class = {}
    for node_id, node in prompt.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    for needed in ("UNETLoader", "DualCLIPLoader", "VAELoader", "KSampler", "FluxKontextImageScale", "ReferenceLatent"):
        assert len(by_class.get(needed, [])) == 1, f"template {TEMPLATE}: expected one {needed}, got {by_class}"
    unet = prompt[by_class["UNETLoader"][0]]
    unet["class_type"] = "KontextTRT_LoadQuantized"
    unet["inputs"] = {"engine": engine, "backend": "pytorch", "checkpoint": "(engine's source)", "compile": False,
                      "cuda_graph": False}
    for loader, (name, cls) in stand_in_encoders(FULL_WIDTH, vae=RecordingVae).items():
        classes[name] = cls
        prompt[by_class[loader][0]].update(class_type=name, inputs={})
    prompt[by_class["KSampler"][0]]["inputs"]["steps"] = STEPS
    loaders = [n for n in prompt.values() if n["class_type"] in ("LoadImage", "LoadImageOutput")]
    assert loaders, f"template {TEMPLATE}: no image loader in {by_class}"
    for node in loaders:  # LoadImageOutput reads ComfyUI's output folder, with an " [output]" annotation
        node["inputs"]["image"] = image + (" [output]" if node["class_type"] == "LoadImageOutput" else "")
    return prompt


def test_official_kontext_template_with_the_packs_loader_runs_to_an_image(comfy, monkeypatch):
    import folder_paths
    import nodes
    from PIL import Image

    from ui_workflow import ui_to_api

    pack, tmp = comfy
    template = official_template()
    prompt = ui_to_api(template, nodes.NODE_CLASS_MAPPINGS)
    unet_name = next(n["inputs"]["unet_name"] for n in prompt.values() if n["class_type"] == "UNETLoader")
    checkpoint = tmp / "diffusion_models" / unet_name
    save(fp8_scaled_state_dict(random_state_dict(FULL_WIDTH, seed=5, dtype=torch.bfloat16)), checkpoint)
    folder_paths.filename_list_cache.clear()
    engine = build_engine(tmp, checkpoint)

    picture = Image.fromarray((np.random.default_rng(1).random((INPUT[1], INPUT[0], 3)) * 255).astype(np.uint8))
    for folder in (folder_paths.get_input_directory(), folder_paths.get_output_directory()):
        picture.save(Path(folder) / "kontext_input.png")
    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    prompt = prepare(prompt, classes, engine, "kontext_input.png")
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", classes)  # the stand-ins, for this test only
    flux = sys.modules[classes["FluxKontextImageScale"].__module__]
    monkeypatch.setattr(flux, "PREFERED_KONTEXT_RESOLUTIONS",
                        [(w // 128 * 16, h // 128 * 16) for w, h in flux.PREFERED_KONTEXT_RESOLUTIONS])
    RecordingVae.decoded.clear()

    executor = run_workflow.execute(run_workflow.new_executor(), prompt)

    saved = [image for node_id, out in executor.history_result["outputs"].items()
             if prompt[node_id]["class_type"] == "SaveImage" for image in out.get("images", [])]
    assert len(saved) == 1, executor.history_result["outputs"]
    path = Path(folder_paths.get_output_directory()) / saved[0].get("subfolder", "") / saved[0]["filename"]
    with Image.open(path) as f:
        assert f.size == OUTPUT, f.size
        pixels = np.asarray(f.convert("RGB"), dtype=np.float32) / 255
    assert len(RecordingVae.decoded) == 1
    decoded = RecordingVae.decoded[0][0].float().numpy()
    assert np.isfinite(decoded).all()
    assert np.abs(pixels - decoded).max() <= 1 / 255 + 1e-6  # the file is the decoded image (8-bit rounding)
    assert pixels.std() > 0.01, pixels.std()  # not a constant image
    print(f"template {TEMPLATE} ({'subgraph' if template.get('definitions', {}).get('subgraphs') else 'flat'}) -> "
          f"{path.name} {f.size}, engine {engine}")
