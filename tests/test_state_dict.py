import pytest
import torch

from engines import (KONTEXT_DEV, NotKontextError, config_from_state_dict, random_state_dict, tiny_config,
                     transformer_from_state_dict)
from engines.tokens import example_inputs


def test_loads_by_bfl_keys_without_copying():
    sd = random_state_dict(tiny_config())
    model = transformer_from_state_dict(sd)
    params = dict(model.named_parameters())
    assert set(params) == set(sd)
    for name, t in sd.items():
        assert params[name].data_ptr() == t.data_ptr(), f"{name} was copied"


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_checkpoint_prefixes_are_stripped_without_copying(prefix):
    sd = random_state_dict(tiny_config())
    full = {prefix + k: v for k, v in sd.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a full checkpoint's VAE key
    model = transformer_from_state_dict(full)
    assert model.img_in.weight.data_ptr() == sd["img_in.weight"].data_ptr()


def test_bf16_state_dict_stays_bf16_and_runs():
    cfg = tiny_config()
    model = transformer_from_state_dict(random_state_dict(cfg, dtype=torch.bfloat16))
    out = model(**example_inputs(cfg, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_config_read_off_the_shapes():
    cfg = tiny_config(depth=2, depth_single_blocks=3, qkv_bias=False, guidance_embed=False)
    assert config_from_state_dict(random_state_dict(cfg)) == cfg


def test_full_size_config_read_off_meta_shapes():
    # Kontext dev's real shapes, without allocating 24 GB: meta tensors carry shapes only.
    with torch.device("meta"):
        from engines import KontextTransformer
        sd = KontextTransformer(KONTEXT_DEV).state_dict()
    assert config_from_state_dict(sd) == KONTEXT_DEV
    n = sum(t.numel() for t in sd.values())
    assert 11.8e9 < n < 12.0e9  # 11.9 B parameters


def test_not_flux_is_refused_with_the_missing_keys():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}  # an SD1.5 UNet key
    with pytest.raises(NotKontextError, match="img_in.weight"):
        transformer_from_state_dict(sd)


def test_partial_flux_names_missing_keys():
    sd = random_state_dict(tiny_config())
    del sd["final_layer.linear.weight"]
    with pytest.raises(NotKontextError, match="final_layer.linear.weight"):
        transformer_from_state_dict(sd)


def test_extra_block_keys_are_refused():
    sd = random_state_dict(tiny_config())
    sd["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(NotKontextError, match="unexpected.*extra"):
        transformer_from_state_dict(sd)


def test_wrong_shape_is_named():
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    sd["single_blocks.1.linear2.weight"] = torch.zeros(3, 3)
    with pytest.raises(NotKontextError, match=r"single_blocks.1.linear2.weight has shape \(3, 3\)"):
        transformer_from_state_dict(sd, config=cfg)


def test_mixed_dtypes_are_refused():
    sd = random_state_dict(tiny_config())
    sd["img_in.bias"] = sd["img_in.bias"].half()
    with pytest.raises(NotKontextError, match="one floating dtype"):
        transformer_from_state_dict(sd)


def test_read_checkpoint_reads_only_the_transformer_by_its_own_keys(tmp_path):
    from safetensors.torch import save_file

    from engines.state_dict import read_checkpoint

    sd = random_state_dict(tiny_config(), dtype=torch.float32)
    file = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    file["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4)  # a VAE in the same file
    save_file(file, str(tmp_path / "kontext.safetensors"))
    got = read_checkpoint(tmp_path / "kontext.safetensors", torch.bfloat16)
    assert set(got) == set(sd)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.equal(got["img_in.weight"], sd["img_in.weight"].to(torch.bfloat16))
    with pytest.raises(FileNotFoundError, match="checkpoint: expected a .safetensors file, got '.*missing.safetensors'"):
        read_checkpoint(tmp_path / "missing.safetensors", torch.bfloat16)
