"""The PyTorch backend: FP8 weights + calibrated scales reproduce ModelOpt's calibrated model."""
import pytest
import torch
from quant_helpers import SIZE, encoded_pairs, tiny_model

pytest.importorskip("modelopt.torch.quantization")

from engines.accuracy import step_outputs  # noqa: E402
from engines.calibrated_state import save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop  # noqa: E402
from engines.quantize import output_error, quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.runtime_torch import (BackendError, FP8GELUMLP, FP8Linear, FP8SingleStreamBlock,  # noqa: E402
                                   load_fp8_transformer, transformer_bytes)


# Bound for "the same FP8 model" on this tiny model. float32 summation order differs between the two, and where it
# moves a value across the midpoint between two FP8 steps that value flips, which the blocks after it carry on; how
# often depends on the CPU's matmul kernels (seen: under 1e-4 and 1.4e-4 on two Xeons, 1.07e-3 on an AVX-512 EPYC).
# What a real defect costs here: activation scales 1.3x too large give 3.0e-2 to 3.4e-2, no quantization at all
# 3.5e-2 to 4.3e-2. 1e-2 stays 3x under the smallest defect and ~10x over the largest CPU noise seen.
SAME_FP8_MODEL = 1e-2


def calibrate_tiny(tmp, attention: bool):
    """(fake-quant model, its 16-bit state dict, calibrated state path, held-out pairs) for the fp8 recipe."""
    pairs = encoded_pairs(tmp, n=4)
    model, sd = tiny_model()
    recipe = load_recipe("fp8", attention=attention)
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:3], steps=2))
    return model, sd, save_calibrated_state(model, recipe, tmp / "state.safetensors"), pairs[3:]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("rt"), attention=False)


@torch.no_grad()
def test_backend_matches_the_calibrated_model(calibrated):
    fake_quant, sd, state, held = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    assert isinstance(backend.single_blocks[0].linear2, FP8Linear)
    assert backend.fused_modulation is not None  # the modulation is weight-only per the recipe, hence fused
    assert isinstance(backend.img_in, torch.nn.Linear) and backend.img_in.weight.dtype == torch.float32  # 16-bit layer
    assert all(isinstance(b.img_mlp, FP8GELUMLP) and isinstance(b.txt_mlp, FP8GELUMLP) for b in backend.double_blocks)
    assert all(isinstance(b, FP8SingleStreamBlock) for b in backend.single_blocks)  # (their numbers: below, on a CPU)
    sigmas = (0.9, 0.5, 0.1)
    want, got = step_outputs(fake_quant, held, sigmas), step_outputs(backend, held, sigmas)
    for key in want:
        cos, rel = output_error(want[key], got[key])
        assert rel < SAME_FP8_MODEL, (key, rel)


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


@pytest.fixture(scope="module")
def calibrated_with_attention(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("rt_attn"), attention=True)


@torch.no_grad()
def test_backend_runs_fp8_attention_as_calibrated(calibrated_with_attention):
    from engines.fp8_attention import FP8Attention

    fake_quant, sd, state, held = calibrated_with_attention
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    blocks = list(backend.double_blocks) + list(backend.single_blocks)
    assert all(isinstance(b.attention, FP8Attention) for b in blocks)
    # Each attention computes what ModelOpt's calibrated QuantAttention computes, on any input.
    for name in ("double_blocks.0.attention", "single_blocks.1.attention"):
        want_module, got_module = fake_quant.get_submodule(name), backend.get_submodule(name)
        quantizers = (want_module.q_bmm_quantizer, want_module.k_bmm_quantizer, want_module.v_bmm_quantizer)
        q, k, v = (torch.randn(2, 4, 80, 32, generator=torch.Generator().manual_seed(i)) * float(qz.amax) / 4
                   for i, qz in enumerate(quantizers))
        want, got = want_module(q, k, v), got_module(q, k, v)
        # (1.0e-5 on one lent Xeon: FP8 flips as above; unquantized attention of the same inputs: 5.8e-2 / 6.0e-2)
        assert ((want - got).norm() / want.norm()).item() < 1e-4, name
    # Whole model: the same up to rare flips of a value between neighbouring FP8 steps, which a random-weight
    # model amplifies (measured up to 4.5e-3), still well apart from 16-bit attention (2e-2 and more).
    sigmas = (0.9, 0.5)
    want, got = step_outputs(fake_quant, held, sigmas), step_outputs(backend, held, sigmas)
    sixteen_bit_attention = step_outputs(load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32,
                                                              fp8_attention=False), held, sigmas)
    for key in want:
        assert output_error(want[key], got[key])[1] < 1e-2, key
        assert output_error(want[key], sixteen_bit_attention[key])[1] > 1.5e-2, key


def test_backend_refuses_a_state_missing_attention_scales(calibrated_with_attention, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, sd, state, _ = calibrated_with_attention
    with safe_open(str(state), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = {k: v for k, v in load_file(str(state)).items() if k != "single_blocks.0.attention.v_bmm_quantizer._amax"}
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    from engines.calibrated_state import CalibratedStateError

    with pytest.raises(CalibratedStateError, match=r"broken.safetensors: expected an amax for each of the \d+ quantizers "
                                                   r"recipe fp8 calibrates, got none for 1: \['single_blocks.0.attention"
                                                   r".v_bmm_quantizer'\]"):
        load_fp8_transformer(sd.__getitem__, broken)


def test_gelu_in_its_sigmoid_form_is_the_same_function(calibrated):
    import torch.nn.functional as F

    from engines.runtime_torch import SigmoidGELU, gelu_tanh_as_sigmoid

    x = torch.linspace(-10, 10, 20001)
    want = F.gelu(x, approximate="tanh")
    assert torch.allclose(gelu_tanh_as_sigmoid(x), want, rtol=1e-5, atol=1e-6)
    assert gelu_tanh_as_sigmoid(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # Compiled, the module runs the sigmoid form; eager, F.gelu itself.
    compiled = torch.compile(SigmoidGELU(), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), gelu_tanh_as_sigmoid(x)) and not torch.equal(compiled(x), want)
    assert torch.equal(SigmoidGELU()(x), want)
    _, sd, state, _ = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    kinds = [type(m).__name__ for m in backend.modules() if type(m).__name__ in ("GELU", "SigmoidGELU")]
    assert kinds == ["SigmoidGELU"] * (2 * len(backend.double_blocks) + len(backend.single_blocks))


def test_weight_only_gemv_is_the_dequantized_linear():
    from engines.fp8 import quantize_fp8
    from engines.runtime_torch import fp8_weight_gemv

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    scale = w.abs().max() / 448.0
    w8, bias, x = quantize_fp8(w, scale), torch.randn(96, generator=g), torch.randn(2, 64, generator=g)
    want = torch.nn.functional.linear(x, w8.float() * scale, bias)
    got = fp8_weight_gemv(x, w8, scale, bias)
    assert got.shape == (2, 96) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_modulation_weights_are_fused_into_one_pass_with_the_same_numbers(calibrated):
    from engines.runtime_torch import FusedModulation, modulation_linears

    _, sd, state, held = calibrated
    fused = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    separate = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32, fuse_modulation=False)
    assert isinstance(fused.fused_modulation, FusedModulation) and separate.fused_modulation is None
    # The fused weight is the only FP8 copy of the modulation weights: the model is no bigger.
    assert fused.fused_modulation.weight.numel() == sum(separate.get_submodule(n).weight.numel()
                                                        for n in modulation_linears(separate))
    fp8_bytes = lambda m: sum(b.numel() for b in m.buffers() if b.dtype == torch.float8_e4m3fn)  # noqa: E731
    assert fp8_bytes(fused) == fp8_bytes(separate)
    sigmas = (0.9, 0.5)
    want, got = step_outputs(separate, held, sigmas), step_outputs(fused, held, sigmas)
    for key in want:
        assert torch.equal(want[key], got[key]), key  # eager: the same per-layer dequantized GEMMs

    # Compiled, all rows come out of one multiply-and-sum over the fused weight, each row with its layer's scale.
    vec = torch.randn(2, fused.config.hidden_size)
    eager_outputs = fused.fused_modulation(vec)
    compiled_outputs = torch.compile(fused.fused_modulation, backend="eager", fullgraph=True)(vec)
    assert len(compiled_outputs) == len(modulation_linears(fused))
    for e, c in zip(eager_outputs, compiled_outputs):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-5)


def test_a_block_with_fused_modulation_says_so_when_called_alone(calibrated):
    _, sd, state, held = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="computed by the model's fused_modulation"):
        backend.single_blocks[0].modulation(torch.zeros(1, backend.config.hidden_size))


@torch.no_grad()
def test_compiled_blocks_give_the_uncompiled_outputs(calibrated):
    """compile_blocks (its blocks' calls wrapped to install the pack's Inductor choices) runs, and compiling
    changes no number beyond float32 summation order (Inductor's CPU backend here; the choices are for its
    Triton reductions, checked in test_compile_cache.py on the GPU)."""
    from engines.runtime_torch import compile_blocks

    _, sd, state, held = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    want = step_outputs(backend, held[:1], (0.5,))
    got = step_outputs(compile_blocks(backend), held[:1], (0.5,))
    assert all(getattr(b, "_compiled_call_impl", None) is not None
               for b in list(backend.double_blocks) + list(backend.single_blocks))
    for key in want:
        assert output_error(want[key], got[key])[1] < 1e-4, key


@torch.no_grad()
def test_compiled_blocks_compile_once_per_sampling_and_once_more_for_all_other_resolutions(calibrated, tmp_path):
    """As the loader compiles them (Dynamo's defaults): a new sigma, guidance or latent compiles nothing (a step
    that did would recompile every step and, past Dynamo's recompile limit, run uncompiled with only a log line),
    and a user's second resolution compiles each block function once more, into a dynamic-shape graph that serves
    every later resolution."""
    from torch._dynamo.utils import counters

    from engines.accuracy import edit_step_inputs
    from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set
    from engines.runtime_torch import compile_blocks

    _, sd, state, _ = calibrated
    torch._dynamo.reset()  # graphs compiled by earlier tests for these block functions would be reused
    backend = compile_blocks(load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32))
    pair = read_calibration_set(write_default_calibration_set(tmp_path / "calib", size=SIZE))[0]
    encode = StandInEncoder(backend.config, n_txt=16)

    def edit_step_at(grid: int, sigma: float, guidance: float, seed: int = 0) -> dict:
        """A batch-1 step of a grid x grid edit (16-pixel token cells) with one same-size reference."""
        return edit_step_inputs(encode(pair, 16 * grid), sigma, seed, guidance)

    def graphs_compiled_by(*steps):
        before = counters["stats"]["unique_graphs"]
        for x in steps:
            backend(**x)
        return counters["stats"]["unique_graphs"] - before

    assert graphs_compiled_by(edit_step_at(8, 0.9, 2.5)) > 0
    assert graphs_compiled_by(edit_step_at(8, 0.5, 2.5, seed=1), edit_step_at(8, 0.1, 4.0, seed=2)) == 0
    assert graphs_compiled_by(edit_step_at(6, 0.9, 2.5)) > 0
    assert graphs_compiled_by(edit_step_at(10, 0.9, 2.5), edit_step_at(7, 0.3, 3.5)) == 0


def test_compile_blocks_refuses_a_mode_it_does_not_pass_on(calibrated):
    from engines.runtime_torch import compile_blocks

    _, sd, state, _ = calibrated
    backend = load_fp8_transformer(sd.__getitem__, state, dtype=torch.float32)
    with pytest.raises(ValueError, match="compile_blocks: mode 'max-autotune'; expected None or 'reduce-overhead'"):
        compile_blocks(backend, mode="max-autotune")


@pytest.fixture(scope="module")
def calibrated_from_fp8_scaled(tmp_path_factory):
    """A tiny Kontext saved in ComfyUI's fp8_scaled layout, calibrated the way a build calibrates it."""
    from checkpoint_files import fp8_scaled_state_dict, save

    from engines.build import StageRecorder, calibrate_or_resume
    from engines.source_weights import open_checkpoint, transformer_from_source
    from quant_helpers import CFG

    tmp = tmp_path_factory.mktemp("rt_fp8_source")
    from engines import random_state_dict

    path = save(fp8_scaled_state_dict(random_state_dict(CFG, seed=5)), tmp / "kontext_fp8_scaled.safetensors")
    pairs = encoded_pairs(tmp, n=4)
    with open_checkpoint(path) as weights:
        model = transformer_from_source(weights, torch.float32)
        state = tmp / "state.safetensors"
        calibrate_or_resume(model, load_recipe("fp8", attention=True), pairs[:3], 2, state, StageRecorder(False))
    return model, path, state, pairs[3:]


@torch.no_grad()
def test_fp8_scaled_source_runs_its_own_fp8_weights_as_calibrated(calibrated_from_fp8_scaled):
    from safetensors.torch import load_file

    from engines.source_weights import dequantized_blocks, open_checkpoint

    fake_quant, path, state, held = calibrated_from_fp8_scaled
    stored = load_file(str(path))
    with open_checkpoint(path) as weights:
        backend = load_fp8_transformer(weights, state, dtype=torch.float32)
    linear2 = backend.single_blocks[0].linear2
    # The file's FP8 bytes and scale, not a second rounding of their dequantized values.
    assert torch.equal(linear2.weight.view(torch.uint8), stored["single_blocks.0.linear2.weight"].view(torch.uint8))
    assert linear2.weight_scale.item() == stored["single_blocks.0.linear2.scale_weight"].item()
    sigmas = (0.9, 0.5, 0.1)
    with dequantized_blocks(fake_quant):
        want = step_outputs(fake_quant, held, sigmas)
    got = step_outputs(backend, held, sigmas)
    for key in want:
        cos, rel = output_error(want[key], got[key])
        assert rel < SAME_FP8_MODEL, (key, rel)


def test_a_state_calibrated_from_other_weights_is_refused_for_an_fp8_source(calibrated_from_fp8_scaled, calibrated):
    from engines.source_weights import open_checkpoint

    _, path, _, _ = calibrated_from_fp8_scaled
    _, _, sixteen_bit_state, _ = calibrated  # calibrated from other (16-bit) weights of the same shapes
    with open_checkpoint(path) as weights:
        with pytest.raises(BackendError, match=r"calibrated weight scale .* is not the checkpoint's FP8 scale .*: the "
                                               r"state was calibrated from other weights than kontext_fp8_scaled"):
            load_fp8_transformer(weights, sixteen_bit_state)
