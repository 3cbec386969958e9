"""The pack loads through ComfyUI's own custom-node loader and its nodes run on ComfyUI objects."""
import pytest
import torch

from comfyui_checkout import import_comfyui, load_pack_into_comfyui, tiny_comfy_kontext
from engines import random_state_dict, tiny_config


@pytest.fixture(scope="module")
def pack_nodes(tmp_path_factory):
    import_comfyui()
    return load_pack_into_comfyui(tmp_path_factory.mktemp("custom_nodes"))


def test_pack_registers_its_nodes(pack_nodes):
    assert "KontextTRT_ModelInfo" in pack_nodes


def test_model_info_describes_a_comfyui_kontext_model(pack_nodes):
    cfg = tiny_config()
    patcher = tiny_comfy_kontext(cfg, random_state_dict(cfg))
    info = pack_nodes["KontextTRT_ModelInfo"].execute(patcher).result[0]
    assert "1 double + 2 single blocks, hidden 128, 4 heads x 32" in info
    assert "float32" in info


def test_model_info_refuses_a_model_that_is_not_flux(pack_nodes):
    class NotFlux:  # a MODEL whose diffusion model is something else entirely
        class model:
            diffusion_model = torch.nn.Linear(4, 4)

    # The pack's NotKontextError is ComfyUI's import of it, another class object than ours: match by base.
    with pytest.raises(ValueError, match="expected a Flux/Kontext transformer with key 'img_in.weight'"):
        pack_nodes["KontextTRT_ModelInfo"].execute(NotFlux())
