"""LoRA on the loader's MODEL inside ComfyUI: LoRA files in two key formats through ComfyUI's own LoraLoaderModelOnly
(its key mapping, its patch objects), stacked at 0.8 and -0.5, sampled by ComfyUI against its own 16-bit model with
the same LoRAs; strength changes under torch.compile; what is refused; and a LoRA baked into an engine at build time.
Runs with a ComfyUI checkout (COMFYUI_PATH), skips with the reason otherwise."""
import sys

import pytest
import torch
from quant_helpers import tiny_fp8_engine

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, tiny_comfy_kontext
from tiny_kontext import tiny_lora
from engines import KontextTransformer, random_state_dict, tiny_config

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("tensorrt_rtx")
CFG = tiny_config()
HIDDEN, MLP = CFG.hidden_size, CFG.mlp_hidden_dim


def linear_layers():
    """The 16-bit model's Linear layers (BFL names) with their (out, in) shapes."""
    with torch.device("meta"):
        model = KontextTransformer(CFG)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def factors(g, out_features, in_features, rank, magnitude=0.35):
    """(up, down) whose product has about `magnitude` times a random-init weight's norm (N(0, 1/in) entries)."""
    up, down = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
    return up * (magnitude * out_features ** 0.5 / (up @ down).norm()), down


def diffusers_lora(seed=2, rank=4):
    """diffusers / ai-toolkit keys (transformer.<diffusers name>.lora_A/lora_B): q, k, v and proj_mlp are slices of
    BFL's fused qkv / linear1, which ComfyUI's mapping gives as (key, offset)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    layers = {}
    for i in range(CFG.depth):
        for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            layers[f"transformer_blocks.{i}.attn.{part}"] = (HIDDEN, HIDDEN)
        for ff in ("ff", "ff_context"):
            layers[f"transformer_blocks.{i}.{ff}.net.0.proj"] = (MLP, HIDDEN)
            layers[f"transformer_blocks.{i}.{ff}.net.2"] = (HIDDEN, MLP)
        layers[f"transformer_blocks.{i}.norm1.linear"] = (6 * HIDDEN, HIDDEN)
    for i in range(CFG.depth_single_blocks):
        for part in ("to_q", "to_k", "to_v"):
            layers[f"single_transformer_blocks.{i}.attn.{part}"] = (HIDDEN, HIDDEN)
        layers[f"single_transformer_blocks.{i}.proj_mlp"] = (MLP, HIDDEN)
        layers[f"single_transformer_blocks.{i}.proj_out"] = (HIDDEN, HIDDEN + MLP)
        layers[f"single_transformer_blocks.{i}.norm.linear"] = (3 * HIDDEN, HIDDEN)
    for name, (out_features, in_features) in layers.items():
        up, down = factors(g, out_features, in_features, rank)
        sd.update({f"transformer.{name}.lora_B.weight": up, f"transformer.{name}.lora_A.weight": down})
    return sd


def lokr_lora(layer):
    """A LoKr (Kronecker) patch on one layer: not a low-rank product."""
    out_features, in_features = linear_layers()[layer]
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_" + layer.replace(".", "_")
    return {f"{key}.lokr_w1": torch.randn(8, 8, generator=g) * 0.1,
            f"{key}.lokr_w2": torch.randn(out_features // 8, in_features // 8, generator=g) * 0.1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import_comfyui()
    import folder_paths
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("lora")
    nodes = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    sd = random_state_dict(CFG, seed=3)
    engine = tiny_fp8_engine(tmp, sd, "tiny.safetensors")
    (tmp / "loras").mkdir()
    save_file(tiny_lora(CFG), str(tmp / "loras" / "kohya.safetensors"))  # kohya keys, every Linear
    save_file(diffusers_lora(), str(tmp / "loras" / "diffusers.safetensors"))
    save_file(lokr_lora("double_blocks.0.img_attn.qkv"), str(tmp / "loras" / "lokr_qkv.safetensors"))
    save_file({**lokr_lora("img_in"), "lora_unet_single_blocks_0_linear2.diff_b": torch.randn(HIDDEN) * 0.1},
              str(tmp / "loras" / "lokr_img_in_and_bias.safetensors"))
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models", "loras")}
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(tmp / "tensorrt")], {".engine", ".plan"})
    for folder in ("diffusion_models", "loras"):
        folder_paths.folder_names_and_paths[folder] = ([str(tmp / folder)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    loader = nodes["KontextTRT_LoadQuantized"]
    yield dict(original=tiny_comfy_kontext(CFG, sd), load=lambda: loader.execute(engine.name, "auto", "tiny.safetensors")
               .result[0], nodes=nodes, engine=engine, tmp=tmp, sd=sd)
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v


def with_loras(model, *loras):
    import nodes

    for name, strength in loras:
        model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
    return model


def sample(model):
    from test_comfyui_loader import sample as comfy_sample

    return comfy_sample(model, 1.0)


STACK = (("kohya.safetensors", 0.8), ("diffusers.safetensors", -0.5))


def test_stacked_loras_in_two_key_formats_sample_like_comfyuis_own_16bit_model(setup):
    from engines.quantize import output_error

    original, loaded = with_loras(setup["original"], *STACK), with_loras(setup["load"](), *STACK)
    # ComfyUI's key mapping found the same tensors on both MODELs: every LoRA key reached the quantized one.
    assert set(loaded.patches) == set(original.patches) and len(original.patches) == len(linear_layers())
    assert sum(len(v) for v in loaded.patches.values()) == sum(len(v) for v in original.patches.values())
    want, got = sample(original), sample(loaded)
    cos, rel = output_error(want, got)
    cos_dropped, rel_dropped = output_error(want, sample(with_loras(setup["load"](), STACK[0])))
    cos_plain, rel_plain = output_error(sample(setup["original"]), sample(setup["load"]()))
    print(f"two LoRAs stacked: cosine {cos:.5f}, relative L2 {rel:.4f} (without LoRAs: cosine {cos_plain:.5f}, "
          f"rel {rel_plain:.4f}; second LoRA dropped: cosine {cos_dropped:.5f}, rel {rel_dropped:.4f})")
    # The fp8 recipe's tolerance on this tiny model after 6 steps (test_comfyui_loader); a dropped LoRA is far off.
    assert cos > 0.99 and rel < 0.15, (cos, rel)
    assert rel_dropped > 3 * rel, (rel, rel_dropped)


def test_a_strength_change_reuses_the_fp8_weights_and_compiles_nothing(setup, monkeypatch):
    """With compile on (as the loader compiles the blocks on a GPU; here Inductor's CPU backend), a second sample
    at another strength runs the graphs the first compiled, on the same FP8 tensors, and the new strength applies.
    The backend is never moved either (ComfyUI's own way to change a loaded model's patches moves it to the offload
    device and back)."""
    from torch._dynamo.utils import counters

    from engines.quantize import output_error
    from engines.runtime_torch import FP8Linear, compile_blocks

    torch._dynamo.reset()
    loaded = setup["load"]()
    backend = loaded.model.diffusion_model.backend
    compile_blocks(backend)
    fp8 = {n: m.weight.data_ptr() for n, m in backend.named_modules() if isinstance(m, FP8Linear)}
    fp8["fused_modulation"] = backend.fused_modulation.weight.data_ptr()

    def graphs_compiled_by(model):
        before = counters["stats"]["unique_graphs"]
        out = sample(model)
        return counters["stats"]["unique_graphs"] - before, out

    assert graphs_compiled_by(loaded)[0] > 0
    assert graphs_compiled_by(with_loras(loaded, ("kohya.safetensors", 0.8)))[0] > 0  # layers gained a branch
    moves = []
    monkeypatch.setattr(backend, "_apply", lambda *a, **k: moves.append(a) or backend)  # what Module.to calls
    compiled, got = graphs_compiled_by(with_loras(loaded, ("kohya.safetensors", -0.3)))
    assert compiled == 0
    now = {n: m.weight.data_ptr() for n, m in backend.named_modules() if isinstance(m, FP8Linear)}
    assert now == {k: v for k, v in fp8.items() if k != "fused_modulation"}
    assert backend.fused_modulation.weight.data_ptr() == fp8["fused_modulation"]
    want = sample(with_loras(setup["original"], ("kohya.safetensors", -0.3)))
    cos, rel = output_error(want, got)
    print(f"compiled, strength -0.3 after 0.8: cosine {cos:.5f}, relative L2 {rel:.4f}")
    assert cos > 0.99 and rel < 0.15, (cos, rel)
    assert graphs_compiled_by(loaded)[0] == 0  # the LoRA taken off again: the graphs without branches
    assert moves == []
    torch._dynamo.reset()


def test_a_lokr_on_an_fp8_layer_is_refused_naming_layer_and_type(setup):
    loaded = setup["load"]()
    errors = sys.modules[type(loaded.model.diffusion_model.lora).__module__].LoRAUnsupported
    with pytest.raises(errors, match=r"lokr patch on double_blocks\.0\.img_attn\.qkv\.weight: that layer is FP8"):
        with_loras(loaded, ("lokr_qkv.safetensors", 1.0))


def test_patches_on_16bit_tensors_are_comfyuis_own_whatever_their_type(setup):
    """A LoKr on img_in (kept 16-bit by the recipe) and a bias diff on an FP8 layer's (16-bit) bias: the backend's
    tensors become exactly what ComfyUI computes for its own 16-bit model, and go back when the LoRA is removed."""
    import comfy.model_management

    stack = (("lokr_img_in_and_bias.safetensors", 0.7),)
    original = with_loras(setup["original"], *stack)
    plain = setup["load"]()
    loaded = with_loras(plain, *stack)
    comfy.model_management.load_models_gpu([original])
    comfy.model_management.load_models_gpu([loaded])
    backend, reference = loaded.model.diffusion_model.backend, original.model.diffusion_model
    assert not torch.equal(reference.img_in.weight, setup["sd"]["img_in.weight"])
    assert torch.equal(backend.img_in.weight, reference.img_in.weight)
    assert torch.equal(backend.single_blocks[0].linear2.bias, reference.single_blocks[0].linear2.bias)
    comfy.model_management.load_models_gpu([plain])  # the clone without LoRA: the originals back, in place
    assert torch.equal(backend.img_in.weight, setup["sd"]["img_in.weight"])
    assert torch.equal(backend.single_blocks[0].linear2.bias, setup["sd"]["single_blocks.0.linear2.bias"])
    comfy.model_management.unload_all_models()


def test_lora_hooks_are_refused(setup):
    loaded = setup["load"]()
    errors = sys.modules[type(loaded.model.diffusion_model).__module__].BackendUnsupported
    with pytest.raises(errors, match="LoRA hooks"):
        loaded.clone().add_hook_patches(None, {"diffusion_model.img_in.weight": (torch.zeros(1),)})


def test_nodes_that_read_the_original_weights_refuse_the_quantized_model(setup):
    """The MODEL's state dict has the original keys (for ComfyUI's LoRA mapping) but FP8 data without scales: Model
    Info and Build Engine must not read it as a checkpoint."""
    loaded = setup["load"]()
    with pytest.raises(ValueError, match="model: the quantized Kontext from Load Quantized Model; this node takes the "
                                         "original model"):
        setup["nodes"]["KontextTRT_ModelInfo"].execute(loaded)


def test_a_tensorrt_engine_refuses_a_lora_naming_it(setup):
    """No GPU here runs TensorRT: the engine's MODEL is made as the loader makes it for that backend (the engine is
    only deserialized at the first step), and LoraLoaderModelOnly on it fails naming the LoRA."""
    from engines.config import KontextConfig
    from engines.engine_store import EngineStore
    from engines.runtime_tensorrt import TensorRTBackend
    from engines.tensorrt_build import import_tensorrt

    backend_model = sys.modules[type(setup["load"]().model.diffusion_model).__module__]
    path = setup["engine"]
    meta = EngineStore(path.parent).read_metadata(path)
    runner = TensorRTBackend(path, meta, import_tensorrt("tensorrt_rtx"), KontextConfig.from_dict(meta["model_config"]))
    cpu = torch.device("cpu")
    model = backend_model.backend_model(runner, CFG, 1, torch.bfloat16, cpu, cpu)
    with pytest.raises(backend_model.BackendUnsupported,
                       match=r"LoRA \(lora [0-9a-f]{12} at strength 0\.8 on \d+ tensors \(keys lora_unet_.*\): a "
                             r"TensorRT engine's weights are fixed when it is built, and this engine was built without"):
        with_loras(model, ("kohya.safetensors", 0.8))


def test_build_engine_bakes_the_models_loras_in_and_the_engine_says_so(setup, monkeypatch):
    """Build Engine on a LoRA'd 16-bit MODEL: calibrated with ComfyUI's merged weights, the sidecar records each LoRA
    (hash, strength) and the unpatched source file; the PyTorch backend refuses that engine, its TensorRT MODEL
    refuses a further LoRA, both naming what is baked in."""
    import comfy.model_management
    from safetensors.torch import load_file
    from test_comfyui_build_node import run

    from engines.config import KontextConfig
    from engines.engine_store import EngineStore
    from engines.runtime_tensorrt import TensorRTBackend
    from engines.source_weights import file_fingerprint
    from engines.tensorrt_build import import_tensorrt

    node = setup["nodes"]["KontextTRT_BuildEngine"]
    build_module = sys.modules[node.__module__]
    monkeypatch.setattr(build_module, "gpu_compute_capability", lambda: (8, 9))  # build for Ada, on this CPU
    lorad = with_loras(setup["original"], ("kohya.safetensors", 0.8))
    comfy.model_management.load_models_gpu([lorad])  # as after a sample: ComfyUI keeps the LoRA merged in place
    merged_qkv = lorad.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.clone()
    engine_name, state = run(node, lorad, quantize_attention=False, steps_per_sample=1, max_samples=2)
    comfy.model_management.unload_all_models()

    folder = setup["tmp"] / "tensorrt"
    meta = EngineStore(folder).read_metadata(folder / engine_name)
    lora_module = sys.modules[build_module.describe_loras.__module__]
    assert meta["loras"] == lora_module.describe_loras(lora_module.diffusion_patches(lorad.patches))
    assert len(meta["loras"]) == 1 and meta["loras"][0]["strength"] == 0.8
    assert meta["loras"][0]["tensors"] == len(linear_layers()) and meta["loras"][0]["type"] == "lora"
    tiny_file = setup["tmp"] / "diffusion_models" / "tiny.safetensors"
    assert meta["source"]["name"] == "tiny.safetensors" and meta["model_fingerprint"] == file_fingerprint(tiny_file)
    amax = load_file(state)["double_blocks.0.img_attn.qkv.weight_quantizer._amax"].float().reshape(())
    assert torch.allclose(amax, merged_qkv.abs().max(), rtol=1e-4)  # calibrated on the merged weight
    assert not torch.allclose(amax, setup["sd"]["double_blocks.0.img_attn.qkv.weight"].abs().max(), rtol=1e-2)

    sha = meta["loras"][0]["sha256"][:12]
    with pytest.raises(ValueError, match=rf"built with LoRA baked in \(lora {sha} at strength 0.8 on 26 tensors"):
        setup["nodes"]["KontextTRT_LoadQuantized"].execute(engine_name, "auto", "tiny.safetensors")
    with pytest.raises(ValueError, match=rf"built with LoRA baked in \(lora {sha} .*the export writes the checkpoint's"):
        setup["nodes"]["KontextTRT_ExportCheckpoint"].execute(engine_name, "(engine's source)", "")
    backend_model = sys.modules[type(setup["load"]().model.diffusion_model).__module__]
    runner = TensorRTBackend(folder / engine_name, meta, import_tensorrt("tensorrt_rtx"),
                             KontextConfig.from_dict(meta["model_config"]))
    cpu = torch.device("cpu")
    trt_model = backend_model.backend_model(runner, CFG, 1, torch.bfloat16, cpu, cpu, baked_loras=meta["loras"])
    with pytest.raises(backend_model.BackendUnsupported, match=rf"this engine was built with lora {sha} at strength 0.8"):
        with_loras(trt_model, ("diffusers.safetensors", 1.0))
