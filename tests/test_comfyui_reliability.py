"""The Load Quantized Model node inside ComfyUI, on damaged files: a damaged engine or checkpoint is refused naming the
file and what to do, and loading removes what builds killed mid-way left in the engine folder (but not the folder of
a build still running)."""
import shutil

import pytest
from safetensors.torch import save_file

import fault_children
from comfyui_checkout import import_comfyui, load_pack_into_comfyui

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture
def comfy(built_store, pairs_dir, tmp_path, tmp_path_factory):
    """ComfyUI with the pack loaded, models/tensorrt a copy of built_store, diffusion_models holding the checkpoint
    the engines were built from. Yields (node classes, engine folder, engine with attention, checkpoint path)."""
    import_comfyui()
    import folder_paths

    nodes = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    root, engine, _ = built_store
    engines = tmp_path / "tensorrt"
    shutil.copytree(root, engines)
    checkpoints = tmp_path / "diffusion_models"
    checkpoints.mkdir()
    sd, _ = fault_children.tiny_inputs(str(pairs_dir))
    checkpoint = checkpoints / "tiny_kontext.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(checkpoint))
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("tensorrt", "diffusion_models")}
    folder_paths.folder_names_and_paths["tensorrt"] = ([str(engines)], {".engine", ".plan"})
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(checkpoints)], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    yield nodes, engines, engines / engine.name, checkpoint
    for k, v in saved.items():
        folder_paths.folder_names_and_paths[k] = v
    folder_paths.filename_list_cache.clear()


def load(nodes, engine, checkpoint="tiny_kontext.safetensors"):
    return nodes["KontextTRT_LoadQuantized"].execute(engine.name, "pytorch", checkpoint, compile=False,
                                                     cuda_graph=False).result[0]


def test_the_loader_node_refuses_a_damaged_engine_naming_it(comfy):
    nodes, _, engine, _ = comfy
    engine.write_bytes(engine.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{engine.name}: expected \d+ bytes as its sidecar {engine.stem}.json records, "
                                         r"got 1000: the engine is damaged .*rebuild it with Kontext TRT: Build Engine"):
        load(nodes, engine)


def test_the_loader_node_refuses_a_damaged_checkpoint_naming_it(comfy):
    nodes, _, engine, checkpoint = comfy
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{checkpoint.name}: not a readable .safetensors file"):
        load(nodes, engine)


def test_loading_removes_what_killed_builds_left_but_not_a_running_builds_folder(comfy):
    from engines.scratch import Scratch

    nodes, engines, engine, _ = comfy
    killed = engines / ".kontext_trt" / "scratch" / "killed_build"
    (killed / "onnx").mkdir(parents=True)
    (killed / "onnx" / "kontext.onnx").write_bytes(b"22 GiB at full size")
    killed.with_name("killed_build.lock").touch()  # its owner's lock went with the process
    with Scratch(engines) as running:
        (running.path / "kontext.onnx").write_bytes(b"being exported")
        load(nodes, engine)
        assert not killed.exists()
        assert (running.path / "kontext.onnx").is_file()
