"""The PyTorch backend: FP8 weights + calibrated scales reproduce ModelOpt's calibrated model."""
import pytest
import torch
from quant_helpers import encoded_pairs, tiny_model

pytest.importorskip("modelopt.torch.quantization")

from engines.accuracy import step_outputs  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop  # noqa: E402
from engines.quantize import output_error, quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.runtime_torch import BackendError, FP8Linear, load_fp8_transformer, transformer_bytes  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    pairs = encoded_pairs(tmp, n=4)
    model, sd = tiny_model()
    recipe = load_recipe("fp8", attention=False)
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:3], steps=2))
    return model, sd, save_calibrated_state(model, recipe, tmp / "state.safetensors"), pairs[3:]


@torch.no_grad()
def test_backend_matches_the_calibrated_model(calibrated):
    fake_quant, sd, state, held = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    assert isinstance(backend.single_blocks[0].linear2, FP8Linear)
    assert backend.double_blocks[0].img_mod.lin.input_scale is None  # weight-only, per the recipe
    assert isinstance(backend.img_in, torch.nn.Linear) and backend.img_in.weight.dtype == torch.float32  # 16-bit layer
    sigmas = (0.9, 0.5, 0.1)
    want, got = step_outputs(fake_quant, held, sigmas), step_outputs(backend, held, sigmas)
    for key in want:
        cos, rel = output_error(want[key], got[key])
        assert rel < 1e-4, (key, rel)  # the same FP8 numbers; float32 summation order only


def test_backend_weights_are_fp8_and_smaller(calibrated):
    _, sd, state, _ = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.bfloat16)
    fp8 = [m for m in backend.modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    assert transformer_bytes(backend) < 0.6 * sum(t.numel() * 2 for t in sd.values())


def test_backend_refuses_nvfp4_states(calibrated, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    import json

    _, sd, state, _ = calibrated
    with safe_open(str(state), framework="pt") as f:
        meta = dict(f.metadata())
    recipe = json.loads(meta["recipe"])
    recipe["gemm"] = {"weights": "nvfp4_block16", "activations": "nvfp4_block16"}
    recipe["name"] = "nvfp4"
    meta["recipe"] = json.dumps(recipe)
    other = tmp_path / "nvfp4.safetensors"
    save_file(load_file(str(state)), str(other), metadata=meta)
    with pytest.raises(BackendError, match="the PyTorch backend runs the fp8 recipe; this state is nvfp4"):
        load_fp8_transformer(sd.__getitem__, other)


def test_checkpoint_of_another_model_is_refused(calibrated):
    from engines import random_state_dict, tiny_config

    _, _, state, _ = calibrated
    other = random_state_dict(tiny_config(hidden_size=64, num_heads=2))
    with pytest.raises(BackendError, match=r"checkpoint: img_in.weight has shape \(64, 64\), but the calibrated state"):
        load_fp8_transformer(other.__getitem__, state)
