"""The TensorRT backend's MODEL in ComfyUI's own sampling, on the CPU: TensorRTBackend over the stand-in engine
(tests/tensorrt_standin.py: the exported graph computed by ONNX Runtime, read from and written to the addresses the
backend binds) wrapped as the loader wraps it, against the loader's PyTorch backend MODEL from the same engine's
calibrated state: a reference latent, CFG 1 and CFG 2.5 (cond and uncond in one batch of 2). Everything around the
engine is ComfyUI's and the pack's own: patchify, the reference-latent packing, the conds, the batch, the dtype
casts (the engine's inputs and output are FP16), the profile choice and the binding.

Tolerance: both MODELs sample the same calibrated FP8 model; their per-step outputs differ by FP8 values rounding
the other way (test_engine_numerics.py: up to 1.7e-2 relative L2 per step on this random tiny model) plus the
engine's FP16 inputs and output. Measured on the final latent after 6 Euler steps (ComfyUI 0.3.64): relative L2
5.0e-3 at CFG 1, 1.4e-2 at CFG 2.5. A defect around the engine costs far more: guidance off by one 0.30 / 0.43,
cond and uncond exchanged in the CFG batch 1.2, another prompt 0.40 / 0.79. Allowed: 0.05 (and cosine >= 0.99,
the recipe's tolerance).
"""
import sys

import pytest
import torch

from comfyui_checkout import import_comfyui, load_pack_into_comfyui
from engines import tiny_config

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")
CFG = tiny_config()
TEXT_TOKENS = 256  # the engine's profiles take 256..512 text tokens, as the real ones do
AGREE = 0.05  # relative L2 of the final latents (see above)


@pytest.fixture(scope="module")
def models(request, tmp_path_factory):
    import_comfyui()  # before the calibrated export: without ComfyUI this skips at once
    import folder_paths
    from safetensors.torch import save_file
    from tensorrt_standin import HostMemoryBackend, save_standin_engine, standin_tensorrt

    from engines.runtime_tensorrt import engine_device_bytes
    from engines.shape_profiles import custom_profile

    export = request.getfixturevalue("tiny_export_fp16")
    tmp = tmp_path_factory.mktemp("comfyui_standin")
    nodes = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    profiles = [custom_profile(64, 128)]  # 128x128 target + reference: 128 image tokens; batch 1..2
    (tmp / "diffusion_models").mkdir()
    checkpoint = tmp / "diffusion_models" / "tiny_kontext.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in export.sd.items()}, str(checkpoint))
    engine, meta = save_standin_engine(export.onnx_path, tmp / "tensorrt", profiles, CFG, export.recipe, export.state,
                                       checkpoint)
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models")}
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(tmp / "tensorrt")], {".engine", ".plan"})
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp / "diffusion_models")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    loader = nodes["KontextTRT_LoadQuantized"]
    pytorch = loader.execute(engine.name, "pytorch", "tiny_kontext.safetensors").result[0]
    # What the loader does with backend "tensorrt" (TensorRTBackend, then backend_model), over the stand-in engine
    backend_model = sys.modules[loader.__module__].backend_model
    trt = standin_tensorrt(profiles, CFG)
    runner = HostMemoryBackend(engine, meta, trt, CFG)
    cpu = torch.device("cpu")
    tensorrt = backend_model(runner, CFG, engine_device_bytes(engine), runner.dtype, cpu, cpu)
    yield pytorch, tensorrt, trt
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v


def conditioning(seed, reference, guidance=2.5):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, CFG.vec_in_dim, generator=g), "guidance": guidance}
    if reference is not None:
        extra["reference_latents"] = [reference]
    return [[torch.randn(1, TEXT_TOKENS, CFG.context_in_dim, generator=g), extra]]


def sample(model, cfg_scale, reference=True, guidance=2.5):
    import comfy.sample

    g = torch.Generator().manual_seed(42)
    ref = torch.randn(1, 16, 16, 16, generator=g) if reference else None  # a 128x128 image's latent
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, 6, cfg_scale, "euler", "simple", conditioning(1, ref, guidance),
                               conditioning(2, ref, guidance), latent, seed=0, disable_pbar=True).float()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5], ids=["cfg1", "cfg2.5_batched"])
def test_comfyui_sampling_through_the_engine_matches_the_pytorch_backend(models, cfg_scale):
    from engines.quantize import output_error

    pytorch, tensorrt, trt = models
    want, got = sample(pytorch, cfg_scale), sample(tensorrt, cfg_scale)
    cos, rel = output_error(want, got)
    print(f"cfg {cfg_scale}: cosine {cos:.5f}, relative L2 {rel:.4f}")
    assert cos >= 0.99 and rel < AGREE, (cos, rel)
    context = trt.module.engines[-1].contexts[-1]
    batch = 2 if cfg_scale > 1 else 1  # ComfyUI runs cond and uncond as one batch of 2
    assert context.refused == [] and context.runs[-1].shapes["img"] == (batch, 128, 64)
    assert context.runs[-1].shapes["txt"] == (batch, TEXT_TOKENS, CFG.context_in_dim)


def test_what_reaches_the_engine_changes_its_result(models):
    """Guards the comparison above: guidance and the CFG batch's row order reach the engine through ComfyUI, and so
    does the reference latent (its 64 tokens are half of the engine's image tokens; this random tiny model barely
    reacts to it: dropping it moves the result by 2.2e-2 at CFG 1, 4.9e-2 at 2.5)."""
    import comfy.sample

    from engines.quantize import output_error

    _, tensorrt, trt = models
    with_reference = sample(tensorrt, 2.5)
    assert output_error(with_reference, sample(tensorrt, 2.5, guidance=3.5))[1] > 2 * AGREE  # measured 0.43
    g = torch.Generator().manual_seed(42)
    reference = torch.randn(1, 16, 16, 16, generator=g)
    latent = torch.zeros(1, 16, 16, 16)
    swapped = comfy.sample.sample(tensorrt, comfy.sample.prepare_noise(latent, 0), 6, 2.5, "euler", "simple",
                                  conditioning(2, reference), conditioning(1, reference), latent, seed=0,
                                  disable_pbar=True).float()
    assert output_error(with_reference, swapped)[1] > 2 * AGREE  # cond and uncond exchanged: measured 1.2
    sample(tensorrt, 1.0, reference=False)
    assert trt.module.engines[-1].contexts[-1].runs[-1].shapes["img"] == (1, 64, 64)
