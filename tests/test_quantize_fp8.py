"""FP8 calibration and fake quantization on CPU with ModelOpt, on a tiny Kontext, attention included."""
import pytest
import torch
from quant_helpers import SIZE, encoded_pairs, tiny_model

pytest.importorskip("modelopt.torch.quantization")

from engines.calibrated_state import CalibratedStateError, load_calibrated_state, save_calibrated_state  # noqa: E402
from engines.calibration import CalibrationCancelled, calibration_forward_loop  # noqa: E402
from engines.accuracy import error_table, step_outputs  # noqa: E402
from engines.quantize import quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.tokens import example_inputs, tokens_for_pixels  # noqa: E402

EMBEDDERS_AND_FINAL = ["final_layer.adaLN_modulation.1", "final_layer.linear", "guidance_in.in_layer",
                       "guidance_in.out_layer", "img_in", "time_in.in_layer", "time_in.out_layer", "txt_in",
                       "vector_in.in_layer", "vector_in.out_layer"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return encoded_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return encoded_pairs(tmp_path_factory.mktemp("held_out"), n=5)[3:]


def eval_inputs(model, sigma):
    grid = tokens_for_pixels(SIZE, SIZE)
    x = example_inputs(model.config, target=grid, references=[grid], n_txt=16, seed=11)
    x["timesteps"] = torch.tensor([sigma])
    return x


def test_fp8_quantizes_what_the_recipe_says(pairs):
    model, _ = tiny_model()
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    seen = []
    report = quantize_transformer(model, load_recipe("fp8"),
                                  calibration_forward_loop(pairs, steps=3, progress=lambda d, t: seen.append((d, t))))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert sorted(report.linear_16bit) == EMBEDDERS_AND_FINAL
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(report.linear_quantized) == n_linear - len(EMBEDDERS_AND_FINAL) > 0
    # Every single block's output projection (linear2, "proj_out" in other naming) is quantized.
    assert all(f"single_blocks.{i}.linear2" in report.linear_quantized for i in range(len(model.single_blocks)))
    modulation = [n for n in report.linear_quantized if n.endswith(("_mod.lin", ".modulation.lin"))]
    assert len(modulation) == 2 * len(model.double_blocks) + len(model.single_blocks)
    assert sorted(report.linear_weight_only) == sorted(modulation)
    token_path = len(report.linear_quantized) - len(modulation)
    assert report.counts["input_quantizer fp8 per-tensor"] == token_path
    assert report.counts["weight_quantizer fp8 per-tensor"] == token_path + len(modulation)
    for kind in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
        assert report.counts[f"{kind} fp8 per-tensor"] == n_blocks
    assert report.uncalibrated == []
    sm = model.single_blocks[0].attention.softmax_quantizer
    assert float(sm.amax) == 1.0  # pinned, not calibrated
    assert "16-bit: img_in" in report.summary()


def test_attention_off_leaves_attention_16bit(pairs):
    model, _ = tiny_model()
    report = quantize_transformer(model, load_recipe("fp8", attention=False), calibration_forward_loop(pairs[:1], steps=2))
    assert not any(k.startswith(("q_bmm", "k_bmm", "v_bmm", "softmax")) for k in report.counts)
    assert report.linear_quantized


@pytest.mark.parametrize("attention", [False, True], ids=["gemm_only", "with_attention"])
def test_fp8_error_per_sigma_on_held_out_pairs(pairs, held_out, attention):
    sigmas = (0.9, 0.6, 0.3, 0.1)
    reference_model, _ = tiny_model()
    reference = step_outputs(reference_model, held_out, sigmas)
    model, sd = tiny_model()
    quantize_transformer(model, load_recipe("fp8", attention=attention), calibration_forward_loop(pairs, steps=4))
    rows = error_table(reference, step_outputs(model, held_out, sigmas))
    assert [r.sigma for r in rows] == list(sigmas)
    for r in rows:
        # Fake quantization really happened (not bit-identical) and stayed close. Measured on this
        # tiny float32 model: cosine >= 0.9979 at every sigma, both ways.
        assert r.rel_l2_mean > 1e-4 and r.cosine_min > 0.995, r
    # Max calibration shares, never rewrites, the caller's weights.
    assert model.img_in.weight.data_ptr() == sd["img_in.weight"].data_ptr()


@torch.no_grad()
def test_calibrated_state_round_trip(pairs, tmp_path):
    model, sd = tiny_model()
    recipe = load_recipe("fp8")
    quantize_transformer(model, recipe, calibration_forward_loop(pairs, steps=2))
    path = save_calibrated_state(model, recipe, tmp_path / "state.safetensors")
    assert not list(tmp_path.glob("*.partial"))
    x = eval_inputs(model, 0.6)
    expected = model(**x)

    restored, _ = tiny_model()  # the same 16-bit weights, fresh module, no calibration
    loaded_recipe, report = load_calibrated_state(restored, path)
    assert loaded_recipe.name == "fp8" and loaded_recipe.attention is not None and report.uncalibrated == []
    torch.testing.assert_close(restored(**x), expected, rtol=0, atol=0)


def test_state_of_another_model_is_refused(pairs, tmp_path):
    from engines import random_state_dict, tiny_config, transformer_from_state_dict

    model, _ = tiny_model()
    recipe = load_recipe("fp8")
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:1], steps=1))
    path = save_calibrated_state(model, recipe, tmp_path / "state.safetensors")
    other = transformer_from_state_dict(random_state_dict(tiny_config(depth=2)))
    with pytest.raises(CalibratedStateError, match="calibrated for a model of config"):
        load_calibrated_state(other, path)


def test_cancel_between_pairs_stops_and_saves_nothing(pairs, tmp_path):
    model, _ = tiny_model()
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 1  # cancel before the second pair

    loop = calibration_forward_loop(pairs, steps=2, should_cancel=should_cancel)
    with pytest.raises(CalibrationCancelled, match="after 1 of 3"):
        quantize_transformer(model, load_recipe("fp8"), loop)
    assert not list(tmp_path.iterdir())


def test_nvfp4_refused_on_cpu_with_a_reason(pairs):
    model, _ = tiny_model()
    if next(model.parameters()).is_cuda:
        pytest.skip("model on CUDA")
    from engines.quantize import QuantizationError

    with pytest.raises(QuantizationError, match="only on CUDA"):
        quantize_transformer(model, load_recipe("nvfp4"), calibration_forward_loop(pairs[:1], steps=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_calibrated_fp8_scales_are_values_the_exported_graph_holds(pairs, tmp_path, dtype, monkeypatch):
    """ModelOpt's export writes each FP8 scale (amax / 448; for Q and K times the attention pattern's D^-1/4) in the
    model's 16-bit dtype: calibration leaves amaxes whose scale is such a value already, with its last significand
    bit set, within one step of the calibrated one, and the saved state keeps them exactly (in float32)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from engines.fp8 import FP8_MAX
    from engines.quant_attention import mha_prescale

    recipe = load_recipe("fp8")
    unsnapped, _ = tiny_model(dtype=dtype)  # the same calibration without the snap: how far it moved
    monkeypatch.setattr("engines.quantize.snap_fp8_scales_for_export", lambda m: 0)
    quantize_transformer(unsnapped, recipe, calibration_forward_loop(pairs[:1], steps=1))
    monkeypatch.undo()
    model, _ = tiny_model(dtype=dtype)
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:1], steps=1))
    before = {n: float(q.amax) for n, q in unsnapped.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}
    step = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    checked = 0
    for name, q in model.named_modules():
        if not (isinstance(q, TensorQuantizer) and q.is_enabled) or name.endswith("softmax_quantizer"):
            continue
        factor = mha_prescale(model.config.head_dim) if name.endswith(("q_bmm_quantizer", "k_bmm_quantizer")) else 1.0
        scale = float(q.amax) * factor / FP8_MAX
        exported = torch.tensor(scale, dtype=torch.float64).to(dtype)
        assert q.amax.dtype == torch.float32 and float(exported) == pytest.approx(scale, rel=1e-6), name
        assert int(exported.view(torch.int16)) & 1, name
        assert abs(float(q.amax) / before[name] - 1) <= step, name
        checked += 1
    assert checked == 2 * 12 + 4 + 3 * 3  # 12 input-quantized Linears, 4 weight-only, Q/K/V of 3 attentions
    assert all(float(q.amax) == 1.0 for n, q in model.named_modules() if n.endswith("softmax_quantizer"))
    state = save_calibrated_state(model, recipe, tmp_path / "state.safetensors")
    restored, _ = tiny_model(dtype=dtype)
    load_calibrated_state(restored, state)
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            assert torch.equal(restored.get_submodule(name).amax, q.amax), name
