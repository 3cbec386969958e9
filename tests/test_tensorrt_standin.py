"""TensorRTBackend's execute path end to end on the CPU: the real backend (deserialize, profile choice, batch split,
dtype casts, 256-byte alignment, binding, execute) against a stand-in engine that computes the exported graph with
ONNX Runtime (tests/tensorrt_standin.py), compared with the PyTorch backend. Only the CUDA stream differs from a GPU
run (HostMemoryBackend).

Tolerances: against the standard-Q/DQ copy run directly on the same FP16-rounded inputs, the engine's output differs
only by its FP16 rounding (relative L2 ~2e-4): allowed 2e-3, where binding a batch row, an input or a dtype wrongly
costs O(1). Against the PyTorch backend, the whole-model tolerance of test_engine_numerics.py (0.08, measured 9e-3
to 1.7e-2 there; here the inputs also arrive in FP16) and the recipe's own (cosine >= Recipe.min_cosine).
"""
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")

from engine_numerics import edit_steps, ort_session, run_session  # noqa: E402
from quant_helpers import CFG  # noqa: E402
from tensorrt_standin import STANDIN_STREAM, HostMemoryBackend, Run, save_standin_engine, standin_tensorrt  # noqa: E402

from engines.contract import INPUT_NAMES  # noqa: E402
from engines.quantize import output_error  # noqa: E402
from engines.runtime_torch import load_fp8_transformer  # noqa: E402
from engines.shape_profiles import ProfileError, custom_profile  # noqa: E402

# Two profiles, as a multi-profile engine has them: one reference up to 96 px (32..72 image tokens), two references
# up to 128 px (48..192); batch 1..2 each.
PROFILES = [custom_profile(64, 96, references=1), custom_profile(64, 128, references=2)]
COPY_TOLERANCE = 2e-3
WHOLE_MODEL_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def engine(tiny_export_fp16, tmp_path_factory):
    export = tiny_export_fp16
    path, meta = save_standin_engine(export.onnx_path, tmp_path_factory.mktemp("tensorrt"), PROFILES, CFG,
                                     export.recipe, export.state)
    return export, path, meta


def backend_of(engine):
    export, path, meta = engine
    trt = standin_tensorrt(PROFILES, CFG)
    return HostMemoryBackend(path, meta, trt, CFG), trt


def rounded_copy_output(export, x):
    """The copy run on the inputs as the engine reads them (its dtypes), the output rounded as it writes it."""
    fp16 = {k: v.to(torch.float16) if v.is_floating_point() and k in ("img", "txt", "y") else v for k, v in x.items()}
    (out,) = run_session(ort_session(export.copy.model), fp16)
    return out.to(torch.float16).float()


@torch.no_grad()
def test_the_engine_runs_the_calibrated_model_through_profile_choice_and_batch_split(engine):
    export, _, meta = engine
    backend, trt = backend_of(engine)
    assert meta["io"]["img"]["dtype"] == "HALF" and backend.dtype == torch.float16
    pytorch = load_fp8_transformer(export.sd32.__getitem__, export.state, dtype=torch.float32)
    small = edit_steps(CFG, 64, 256, [0.9])  # 32 image tokens: profile 0
    large = edit_steps(CFG, 128, 512, [0.9, 0.5, 0.2])  # 128 image tokens at batch 3: profile 1, as rows 0..1 and 2
    for x, profile, chunks in [(small, 0, [(0, 1)]), (large, 1, [(0, 2), (2, 3)])]:
        got = backend(**x)
        assert got.dtype == torch.float16 and got.shape == (x["img"].shape[0], x["img"].shape[1], CFG.out_channels)
        context = trt.module.engines[0].contexts[0]
        assert context.refused == []
        assert context.runs[-len(chunks):] == [
            Run(profile, STANDIN_STREAM, {name: (stop - start,) + tuple(x[name].shape[1:]) for name in INPUT_NAMES})
            for start, stop in chunks]
        assert output_error(rounded_copy_output(export, x), got.float())[1] < COPY_TOLERANCE
        n_target = x["img"].shape[1] // 2
        cos, rel = output_error(pytorch(**x)[:, :n_target], got[:, :n_target].float())
        assert cos >= export.recipe.min_cosine and rel < WHOLE_MODEL_TOLERANCE, (cos, rel)
    # one engine, one context, the profile switched once (TensorRT forgets shapes and addresses on a switch)
    assert len(trt.module.engines) == 1 and len(trt.module.engines[0].contexts) == 1
    assert trt.module.engines[0].contexts[0].profile_calls == [(0, STANDIN_STREAM), (1, STANDIN_STREAM)]


@torch.no_grad()
def test_what_the_stand_in_refuses_reaches_the_caller_as_the_real_engine_would(engine, monkeypatch):
    """Guards the stand-in: it is not lenient where TensorRT is not."""
    export, _, _ = engine
    x = edit_steps(CFG, 64, 256, [0.9])
    # a profile choice that ignores the token counts: the engine refuses the shape, the backend says so
    backend, trt = backend_of(engine)
    monkeypatch.setattr("engines.runtime_tensorrt.plan_batches", lambda profiles, batch, n_img, n_txt:
                        [type("Chunk", (), {"profile": 1, "start": 0, "stop": batch})()])
    with pytest.raises(ProfileError, match=r"input img of shape \(1, 32, 64\) is outside the selected profile"):
        backend(**x)
    assert trt.module.engines[0].contexts[0].refused[0][:2] == ("set_input_shape", "img")
    monkeypatch.undo()
    # inputs bound in float32 where the engine reads FP16: garbage, as on a GPU
    from engines.runtime_tensorrt import engine_ready

    backend, trt = backend_of(engine)
    monkeypatch.setattr("engines.runtime_tensorrt.engine_ready", lambda t, dtype: engine_ready(t, t.dtype))
    wrong = backend(**{k: v.clone() for k, v in x.items()})
    assert not output_error(rounded_copy_output(export, x), wrong.float())[1] < 0.5  # (NaN, even: float32 bits as FP16)
