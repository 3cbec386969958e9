"""The loader's MODEL in ComfyUI's own sampling: reference latent, CFG 1 and CFG > 1 (batched cond/uncond),
against the original 16-bit model; and what it must refuse."""
import sys

import pytest
import torch
from quant_helpers import tiny_fp8_engine

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, tiny_comfy_kontext
from engines import random_state_dict, tiny_config

pytest.importorskip("modelopt.torch.quantization")
CFG = tiny_config()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import_comfyui()
    import folder_paths

    pytest.importorskip("tensorrt_rtx")
    tmp = tmp_path_factory.mktemp("loader")
    nodes = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    sd = random_state_dict(CFG, seed=3)
    engine = tiny_fp8_engine(tmp, sd, "tiny_kontext.safetensors")
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models")}
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(tmp / "tensorrt")], {".engine", ".plan"})
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp / "diffusion_models")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    loaded = nodes["KontextTRT_LoadQuantized"].execute(engine.name, "auto", "tiny_kontext.safetensors").result[0]
    yield tiny_comfy_kontext(CFG, sd), loaded, nodes, engine.name
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v


def conditioning(seed, reference):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, CFG.vec_in_dim, generator=g), "guidance": 2.5,
             "reference_latents": [reference]}
    return [[torch.randn(1, 6, CFG.context_in_dim, generator=g), extra]]


def sample(model, cfg_scale, seed=0):
    import comfy.sample

    g = torch.Generator().manual_seed(42)
    reference = torch.randn(1, 16, 16, 16, generator=g)  # a 128x128 reference image's latent
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 6, cfg_scale, "euler", "simple", conditioning(1, reference),
                               conditioning(2, reference), latent, seed=seed, disable_pbar=True)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5], ids=["cfg1", "cfg2.5_batched"])
def test_comfyui_sampling_matches_the_original_model(setup, cfg_scale):
    original, loaded, _, _ = setup
    from engines.quantize import output_error

    want, got = sample(original, cfg_scale), sample(loaded, cfg_scale)
    cos, rel = output_error(want, got)
    # The fp8 recipe's error on this tiny model after 6 sampling steps; a broken swap is far off (cos ~0).
    print(f"cfg {cfg_scale}: cosine {cos:.5f}, relative L2 {rel:.4f}")
    assert cos > 0.99 and rel < 0.15, (cos, rel)
    assert rel > 1e-4  # FP8 really ran


def test_dropping_the_reference_changes_the_result(setup):
    """Guards the test above: the reference latent reaches the quantized backend."""
    import comfy.sample

    _, loaded, _, _ = setup
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    g = torch.Generator().manual_seed(42)
    ref = torch.randn(1, 16, 16, 16, generator=g)
    with_ref = sample(loaded, 1.0)
    cond = conditioning(1, ref)
    del cond[0][1]["reference_latents"]
    without = comfy.sample.sample(loaded, noise, 6, 1.0, "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)
    assert (with_ref - without).norm() / without.norm() > 1e-2


def test_conditioning_goes_to_the_sampling_device_once_per_sample(setup):
    """ComfyUI encodes the conds once per sample with the load device (encode_model_conds); the loaded MODEL
    puts their tensors there then, so no model call copies them from CPU memory (a sync per step)."""
    _, loaded, _, _ = setup
    import comfy.conds

    g = torch.Generator().manual_seed(0)
    kwargs = dict(cross_attn=torch.randn(1, 6, CFG.context_in_dim, generator=g),
                  pooled_output=torch.randn(1, CFG.vec_in_dim, generator=g), guidance=2.5,
                  reference_latents=[torch.randn(1, 16, 16, 16, generator=g)], noise=torch.zeros(1, 16, 16, 16),
                  width=128, height=128, prompt_type="positive")
    on_cpu = loaded.model.extra_conds(**kwargs)
    moved = loaded.model.extra_conds(**kwargs, device=torch.device("meta"))
    assert {"c_crossattn", "y", "guidance", "ref_latents"} <= set(moved) and set(moved) == set(on_cpu)
    for name, cond in moved.items():
        tensors = cond.cond if isinstance(cond.cond, list) else [cond.cond]
        assert all(t.device.type == "meta" for t in tensors if isinstance(t, torch.Tensor)), name
        assert type(cond) is type(on_cpu[name])
    assert isinstance(moved["ref_latents"], comfy.conds.CONDList) and len(moved["ref_latents"].cond) == 1
    assert all(t.device.type == "cpu" for t in [on_cpu["c_crossattn"].cond, on_cpu["guidance"].cond])


def test_loaded_model_costs_fp8_memory_not_16bit(setup):
    original, loaded, _, _ = setup
    assert loaded.model_size() < 0.6 * original.model_size()
    assert not any(p.numel() for n, p in loaded.model.diffusion_model.named_parameters() if not n.startswith("backend."))


def test_refusals(setup):
    _, loaded, nodes, engine = setup
    backend_flux = loaded.model.diffusion_model
    errors = sys.modules[type(backend_flux).__module__].BackendUnsupported
    args = (torch.zeros(1, 4, 64), torch.zeros(1, 4, 3), torch.zeros(1, 2, CFG.context_in_dim), torch.zeros(1, 2, 3),
            torch.zeros(1), torch.zeros(1, CFG.vec_in_dim), torch.zeros(1))
    with pytest.raises(errors, match="ControlNet"):
        backend_flux.forward_orig(*args, control={"input": []})
    with pytest.raises(errors, match="block patches"):
        backend_flux.forward_orig(*args, transformer_options={"patches_replace": {"dit": {("double_block", 0): None}}})
    with pytest.raises(errors, match="attention masks"):
        backend_flux.forward_orig(*args, attn_mask=torch.zeros(1))
    lora_errors = sys.modules[type(backend_flux.lora).__module__].LoRAUnsupported
    with pytest.raises(lora_errors, match="diff patch on double_blocks.0.img_attn.qkv.weight: that layer is FP8"):
        loaded.clone().add_patches({"diffusion_model.double_blocks.0.img_attn.qkv.weight": (torch.zeros(1),)}, 1.0)


def test_backend_choice_on_this_machine(setup, caplog):
    """auto ran PyTorch above (no GPU here runs TensorRT) and said why; an explicit tensorrt is refused."""
    _, loaded, nodes, engine = setup
    import logging

    assert type(loaded.model.diffusion_model.backend).__name__ == "KontextTransformer"
    node = nodes["KontextTRT_LoadQuantized"]
    with caplog.at_level(logging.INFO):
        uncompiled = node.execute(engine, "auto", "tiny_kontext.safetensors", compile=True).result[0]
    assert "runs on the pytorch backend: the TensorRT engine cannot run here" in caplog.text
    # compile is CUDA-only: asked for on this CPU, the node says it is not done (and does not do it).
    assert "compile is on, but cpu is not a CUDA device: the blocks run uncompiled" in caplog.text
    assert "cuda_graph is on, but cpu is not a CUDA device: steps run without CUDA graphs" in caplog.text
    block = uncompiled.model.diffusion_model.backend.single_blocks[0]
    assert getattr(block, "_compiled_call_impl", None) is None
    errors = sys.modules[node.__module__].choose_backend.__globals__["EngineMismatch"]
    with pytest.raises(errors, match="TensorRT engines run on an NVIDIA GPU; none was found"):
        node.execute(engine, "tensorrt", "tiny_kontext.safetensors")


def test_model_management_loads_whole_and_unload_releases_the_backend(setup, monkeypatch):
    """lowvram streaming cannot apply to FP8 buffers or an engine: ComfyUI gets all or nothing, and an
    unload reaches the backend (a TensorRT engine frees its GPU memory there)."""
    _, loaded, _, _ = setup
    model = loaded.clone()
    released = []
    monkeypatch.setattr(model.model.diffusion_model.backend, "release", lambda: released.append(True), raising=False)
    model.partially_load(torch.device("cpu"), extra_memory=1)  # ComfyUI offering 1 byte: loads whole anyway
    assert model.loaded_size() == model.model_size() and not model.model.model_lowvram
    assert model.partially_unload(torch.device("cpu"), memory_to_free=1) == 0  # -> ComfyUI unloads it whole
    model.detach()
    assert released == [True] and model.loaded_size() == 0


def test_a_clone_let_go_while_the_model_stays_loaded_keeps_the_backend(setup, monkeypatch):
    """Each sample ComfyUI loads the sampler's clone and detaches the previous one (unpatch_all=False), and a
    collected clone detaches itself the same way: the backend (a TensorRT context, the step's CUDA graphs)
    must survive that, or every sample would rebuild it."""
    import comfy.model_management

    _, loaded, _, _ = setup
    released = []
    monkeypatch.setattr(loaded.model.diffusion_model.backend, "release", lambda: released.append(True), raising=False)
    for _ in range(2):
        comfy.model_management.load_models_gpu([loaded.clone()])
    loaded.clone().detach(unpatch_all=False)
    assert released == []
    comfy.model_management.unload_all_models()  # a real unload still releases it
    assert released


def test_bf16_backend_sees_what_comfyuis_bf16_flux_sees(setup):
    """In BF16 ComfyUI's Flux embeds guidance as 1000 * guidance rounded to BF16 (2496 for 2.5); a backend
    embedding 2500 drifts far from the original over sampling. Same weights, no quantization: only the
    path differs, so the results must agree to BF16 rounding."""
    import comfy.model_management

    _, _, nodes, _ = setup
    backend_model = sys.modules[nodes["KontextTRT_LoadQuantized"].__module__].backend_model
    from engines import transformer_from_state_dict

    sd = {k: v.to(torch.bfloat16) for k, v in random_state_dict(CFG, seed=5).items()}
    cpu = torch.device("cpu")
    original = tiny_comfy_kontext(CFG, sd, dtype=torch.bfloat16)
    ours = backend_model(transformer_from_state_dict(sd), CFG, 0, torch.bfloat16, cpu, cpu)
    from engines.quantize import output_error

    cos, rel = output_error(sample(original, 1.0).float(), sample(ours, 1.0).float())
    comfy.model_management.unload_all_models()
    assert cos > 0.999 and rel < 0.03, (cos, rel)
