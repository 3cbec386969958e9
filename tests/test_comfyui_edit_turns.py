"""Multi-turn editing through ComfyUI's own execution engine: a three-turn API graph on a tiny Kontext,
ComfyUI's cache re-running only the turn whose instruction changed (and what follows it), and the
errors a turn gives for inputs it cannot edit.

MODEL and its sampling are ComfyUI's (tiny random-weight Flux); CLIP and VAE are stand-ins with FLUX's
interfaces (a tiny T5-XXL / FLUX VAE cannot be built), registered as test-only loader nodes.
"""

from pathlib import Path

import pytest
import torch

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, tiny_comfy_kontext
from engines import random_state_dict, tiny_config
from tiny_kontext import StandInClip, StandInVae, demo_image

import run_workflow  # scripts/, on the path through comfyui_checkout

CFG = tiny_config()
CALLS = {"encode": [], "sample": 0}


class TestKontextLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return tiny_comfy_kontext(CFG, random_state_dict(CFG, seed=11)), StandInClip(CALLS["encode"].append), StandInVae()


class TestSourceImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return (demo_image(),)


def three_turns(instructions=("remove the people", "make it dusk", "add rain")):
    turn = lambda i, src: {"class_type": "KontextTRT_EditTurn", "inputs": {  # noqa: E731
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "instruction": instructions[i], "seed": 7 + i,
        "steps": 3, "guidance": 2.5, "resize": "keep", "reference_method": "offset", **src}}
    return {"1": {"class_type": "TestKontextLoader", "inputs": {}},
            "2": {"class_type": "TestSourceImage", "inputs": {}},
            "10": turn(0, {"image": ["2", 0]}), "11": turn(1, {"previous": ["10", 1]}), "12": turn(2, {"previous": ["11", 1]}),
            "13": {"class_type": "KontextTRT_EditHistory", "inputs": {"turn": ["12", 1]}},
            "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}}


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    import_comfyui()
    import folder_paths
    import nodes

    # Each turn previews its result in ComfyUI's temp folder: a fresh one here, not the checkout's.
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("comfy_temp")))
    pack = load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))
    nodes.NODE_CLASS_MAPPINGS.update(TestKontextLoader=TestKontextLoader, TestSourceImage=TestSourceImage)
    return run_workflow.new_executor(), pack


def run(executor, prompt, targets=None):
    """ComfyUI's validation and execution, as the headless runner does them (raises on either failing)."""
    return run_workflow.execute(executor, prompt, targets)


def test_three_turns_run_and_only_the_changed_turn_reruns(executor, monkeypatch):
    import comfy.sample

    executor, pack = executor
    real_sample = comfy.sample.sample

    def counting_sample(*a, **k):
        CALLS["sample"] += 1
        return real_sample(*a, **k)

    monkeypatch.setattr(comfy.sample, "sample", counting_sample)
    CALLS["encode"].clear()
    CALLS["sample"] = 0
    run(executor, three_turns())
    assert CALLS["sample"] == 3 and CALLS["encode"] == ["remove the people", "make it dusk", "add rain"]
    history = executor.history_result["outputs"]["14"]["images"]
    assert len(history) == 1  # the history sheet was saved by ComfyUI's PreviewImage

    CALLS["encode"].clear()
    CALLS["sample"] = 0
    run(executor, three_turns(("remove the people", "make it dusk", "add snow")))
    # ComfyUI's cache kept turns 1 and 2: only turn 3 encoded its instruction and sampled again.
    assert CALLS["sample"] == 1 and CALLS["encode"] == ["add snow"]
    CALLS["encode"].clear()
    CALLS["sample"] = 0
    run(executor, three_turns(("remove the people", "make it night", "add snow")))
    assert CALLS["sample"] == 2 and CALLS["encode"] == ["make it night", "add snow"]


def test_a_turn_queued_alone_runs_what_it_needs_and_previews_its_image(executor, monkeypatch):
    """What the chat panel does: queue only the newest turn (ComfyUI's partial execution of output nodes)."""
    import comfy.sample
    import folder_paths

    _, pack = executor
    fresh = run_workflow.new_executor()  # an empty cache
    real_sample = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: CALLS.__setitem__("sample", CALLS["sample"] + 1)
                        or real_sample(*a, **k))
    CALLS["encode"].clear()
    CALLS["sample"] = 0
    outputs = run(fresh, three_turns(), targets=["11"]).history_result["outputs"]
    # Turn 2 and the turn it continues ran; turn 3 and the history sheet did not.
    assert CALLS["sample"] == 2 and CALLS["encode"] == ["remove the people", "make it dusk"]
    assert sorted(outputs) == ["10", "11"]
    for node_id in ("10", "11"):
        (image,) = outputs[node_id]["images"]
        assert image["type"] == "temp"
        path = Path(folder_paths.get_temp_directory()) / image["subfolder"] / image["filename"]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CALLS["encode"].clear()
    CALLS["sample"] = 0
    run(fresh, three_turns(), targets=["12"])
    assert CALLS["sample"] == 1 and CALLS["encode"] == ["add rain"]  # turns 1 and 2 came from ComfyUI's cache


def test_turns_chain_latents_and_carry_their_history(executor):
    executor, pack = executor
    node = pack["KontextTRT_EditTurn"]
    import nodes

    model, clip, vae = nodes.NODE_CLASS_MAPPINGS["TestKontextLoader"]().load()
    image = TestSourceImage().make()[0]
    decodes = []
    real_decode = vae.decode
    vae.decode = lambda latent: decodes.append(latent) or real_decode(latent)
    encodes = []
    real_encode = vae.encode
    vae.encode = lambda px: encodes.append(px) or real_encode(px)
    args = dict(model=model, clip=clip, vae=vae, seed=1, steps=2, guidance=2.5, resize="keep")
    first = node.execute(instruction="remove the people", image=image, **args).result[1]
    second = node.execute(instruction="make it dusk", previous=first, **args).result[1]
    branch = node.execute(instruction="make it sunny", previous=first, **args).result[1]
    assert len(encodes) == 1  # only the source image was encoded: no VAE round trip between turns
    assert [t.instruction for t in second.history()] == ["remove the people", "make it dusk"]
    assert second.parent is first and branch.parent is first and second.number == branch.number == 2
    assert first.source_image.shape == (1, 64, 80, 3) and first.latent.shape == (1, 16, 8, 10)
    # An extra reference image reaches the model through ComfyUI's reference latents (and changes the edit).
    with_extra = node.execute(instruction="make it dusk", previous=first, extra_reference=image, **args).result[1]
    assert len(encodes) == 2 and not torch.allclose(with_extra.latent, second.latent, atol=1e-3)
    sheet, text = pack["KontextTRT_EditHistory"].execute(second).result
    assert sheet.shape[0] == 1 and sheet.shape[-1] == 3 and sheet.shape[2] > 2 * sheet.shape[1] // 2
    assert "turn 2: 'make it dusk' (seed 1, 2 steps, guidance 2.5)" in text


def test_bad_inputs_get_clear_node_errors_and_earlier_turns_survive(executor):
    executor, pack = executor
    node = pack["KontextTRT_EditTurn"]
    import nodes

    model, clip, vae = nodes.NODE_CLASS_MAPPINGS["TestKontextLoader"]().load()
    image = TestSourceImage().make()[0]
    args = dict(model=model, clip=clip, vae=vae, seed=1, steps=2, guidance=2.5, resize="keep")
    first = node.execute(instruction="remove the people", image=image, **args).result[1]
    errors = type(first).__module__
    with pytest.raises(ValueError, match="instruction: expected an edit instruction .* got an empty text"):
        node.execute(instruction="  ", previous=first, **args)
    with pytest.raises(ValueError, match="got neither"):
        node.execute(instruction="x", **args)
    with pytest.raises(ValueError, match="previous: expected a Kontext edit turn, got Tensor"):
        node.execute(instruction="x", previous=image, **args)
    with pytest.raises(ValueError, match="image: expected an IMAGE .* got \\(3, 4\\)"):
        node.execute(instruction="x", image=torch.zeros(3, 4), **args)

    class SD15Vae(StandInVae):
        latent_channels = 4
    with pytest.raises(ValueError, match="vae: expected the FLUX VAE \\(16 latent channels\\), got a VAE with 4"):
        node.execute(instruction="x", previous=first, **{**args, "vae": SD15Vae()})

    import comfy.model_base
    import comfy.model_patcher

    class NotFlux(comfy.model_base.BaseModel):
        def __init__(self):
            torch.nn.Module.__init__(self)
    not_kontext = comfy.model_patcher.ModelPatcher(NotFlux(), torch.device("cpu"), torch.device("cpu"), size=1)
    with pytest.raises(ValueError, match="model: expected a FLUX.1 Kontext \\[dev\\] model .* got NotFlux"):
        node.execute(instruction="x", previous=first, **{**args, "model": not_kontext})
    # The earlier turn is untouched and still continues.
    again = node.execute(instruction="make it dusk", previous=first, **args).result[1]
    assert again.parent is first and first.latent.isfinite().all()
    assert errors == "engines.edit_turns" or errors.endswith(".engines.edit_turns")


def test_headless_runner_executes_the_shipped_comparison_workflow_on_the_tiny_model(executor, tmp_path, capsys):
    """The headless runner (docs/development.md): the shipped API workflow through ComfyUI's executor; no weights here, so tiny."""

    assert run_workflow.main(["--out", str(tmp_path), "--tiny-steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "on the tiny random-weight Kontext (missing: diffusion_models/flux1-kontext-dev.safetensors" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    # two chains (original, quantized) x (3 turns + the history sheet)
    assert len(names) == 8 and sum(n.startswith("kontext_original_turn") for n in names) == 3, names
    assert any(n.startswith("kontext_quantized_history") for n in names)


def test_headless_runner_executes_the_shipped_lora_workflow_on_the_tiny_model(executor, tmp_path, capsys):
    """The LoRA workflow: its LoRA file is missing here too, so the tiny run applies a random LoRA to the tiny model
    through ComfyUI's own LoRA loading, at the workflow's strength, between the loader and the turns."""
    workflow = run_workflow.ROOT / "workflows" / "api" / "kontext_three_turn_edit_lora.json"
    assert run_workflow.main([str(workflow), "--out", str(tmp_path), "--tiny-steps", "2"]) == 0
    assert "loras/kontext_lora.safetensors" in capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 4 and sum(n.startswith("kontext_lora_turn") for n in names) == 3, names
