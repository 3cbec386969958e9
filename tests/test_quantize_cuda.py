"""NVFP4 and SVDQuant NVFP4 (ModelOpt fake-quantizes them only on CUDA), on a tiny Kontext.

Marked `cuda`; skipped without an NVIDIA GPU. Run on an H100 (the results: docs/accuracy.md).
"""
import fnmatch

import pytest
import torch
from quant_helpers import encoded_pairs, tiny_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (ModelOpt NVFP4 is CUDA-only)")]
pytest.importorskip("modelopt.torch.quantization")

from engines.accuracy import error_table, step_outputs  # noqa: E402
from engines.calibrated_state import load_calibrated_state, save_calibrated_state  # noqa: E402
from engines.calibration import calibration_forward_loop  # noqa: E402
from engines.quantize import output_error, quantize_transformer  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402

SIGMAS = (0.9, 0.5, 0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pairs = encoded_pairs(tmp_path_factory.mktemp("p"), n=5)
    reference_model, _ = tiny_model(device="cuda")
    return pairs[:3], pairs[3:], step_outputs(reference_model, pairs[3:], SIGMAS)


def quantized(recipe_name, pairs):
    model, sd = tiny_model(device="cuda")
    originals = {k: v.clone() for k, v in sd.items()}
    report = quantize_transformer(model, load_recipe(recipe_name), calibration_forward_loop(pairs, steps=3))
    return model, sd, originals, report


@torch.no_grad()
def test_nvfp4_quantizes_per_recipe_and_stays_close(data):
    pairs, held, reference = data
    model, _, _, report = quantized("nvfp4", pairs)
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    recipe = load_recipe("nvfp4")
    fp8_layers = [n for n in report.linear_quantized if any(fnmatch.fnmatchcase(n, p) for p, *_ in recipe.gemm_overrides)]
    assert len(fp8_layers) == 4 * len(model.double_blocks)  # the image stream's qkv, proj, mlp.0, mlp.2
    nvfp4_layers = len(report.linear_quantized) - len(report.linear_weight_only) - len(fp8_layers)
    assert report.counts["weight_quantizer nvfp4 per-block16"] == report.counts["input_quantizer nvfp4 per-block16"] == nvfp4_layers
    assert report.counts["input_quantizer fp8 per-tensor"] == len(fp8_layers)
    assert report.counts["weight_quantizer fp8 per-tensor"] == len(report.linear_weight_only) + len(fp8_layers)
    assert report.counts["q_bmm_quantizer fp8 per-block32"] == report.counts["k_bmm_quantizer fp8 per-block32"] == n_blocks
    assert report.counts["v_bmm_quantizer fp8 per-tensor"] == report.counts["softmax_quantizer fp8 per-tensor"] == n_blocks
    rows = error_table(reference, step_outputs(model, held, SIGMAS))
    print("nvfp4", rows)
    assert all(r.rel_l2_mean > 1e-3 and r.cosine_min > 0.95 for r in rows), rows


@torch.no_grad()
def test_svdquant_adds_rank32_branches_and_leaves_the_callers_weights(data, tmp_path):
    pairs, held, reference = data
    model, sd, originals, report = quantized("svdquant_nvfp4", pairs)
    qkv = model.double_blocks[0].txt_attn.qkv  # an NVFP4 layer
    assert tuple(qkv.weight_quantizer.svdquant_lora_a.shape) == (32, qkv.in_features)
    assert tuple(qkv.weight_quantizer.svdquant_lora_b.shape) == (qkv.out_features, 32)
    # The layers the recipe puts in FP8 (image stream, modulation) are max-calibrated, with no low-rank branch.
    for fp8_layer in (model.double_blocks[0].img_attn.qkv, model.single_blocks[0].modulation.lin):
        assert getattr(fp8_layer.weight_quantizer, "svdquant_lora_a", None) is None
    for k, v in sd.items():  # ComfyUI's tensors: SVDQuant rewrote private copies only
        assert torch.equal(v, originals[k]), k
    rows = error_table(reference, step_outputs(model, held, SIGMAS))
    print("svdquant", rows)
    assert all(r.cosine_min > 0.95 for r in rows), rows

    x_out = step_outputs(model, held[:1], (0.5,))
    path = save_calibrated_state(model, load_recipe("svdquant_nvfp4"), tmp_path / "svd.safetensors")
    restored, _ = tiny_model(device="cuda")
    recipe, _ = load_calibrated_state(restored, path)
    assert recipe.algorithm["method"] == "svdquant"
    # The same calibration, up to GPU kernel nondeterminism: far below the quantization error (~0.1).
    cos, rel = output_error(x_out[(0, 0.5)], step_outputs(restored, held[:1], (0.5,))[(0, 0.5)])
    assert rel < 2e-3, rel


def test_low_vram_calibration_streams_blocks_and_keeps_weights_in_cpu_memory(data, tmp_path):
    from engines.build import StageRecorder, calibrate_or_resume

    pairs, held, reference = data
    model, sd = tiny_model(device="cpu")
    torch.cuda.reset_peak_memory_stats()
    calibrate_or_resume(model, load_recipe("fp8"), pairs, 2, tmp_path / "s.safetensors", StageRecorder(cuda=True),
                        low_vram=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.img_in.weight.data_ptr() == sd["img_in.weight"].data_ptr()  # still ComfyUI's tensor, no copy
    block_bytes = sum(p.numel() * p.element_size() for p in model.single_blocks[0].parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert block_bytes < model_bytes / 3
    amax = model.single_blocks[0].linear1.input_quantizer.amax
    assert amax is not None and amax.device.type == "cpu"


def test_nvfp4_exports_packed_fp4_weights(data, tmp_path):
    """ModelOpt's NVFP4 ONNX flow on our transformer. With KONTEXT_KEEP_EXPORT=<dir> the ONNX is kept
    there; tests/data/tiny_nvfp4.onnx came from this test on an H100 (test_engine_build.py builds it in CI)."""
    import os
    import shutil
    from collections import Counter

    import onnx

    from engines.onnx_export import export_onnx

    pairs, _, _ = data
    model, _ = tiny_model(device="cuda", dtype=torch.float16)
    quantize_transformer(model, load_recipe("nvfp4", attention=False), calibration_forward_loop(pairs, steps=2))
    path = export_onnx(model, tmp_path / "tiny_nvfp4.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    print("nvfp4 onnx ops", dict(ops))
    assert ops["TRT_FP4DynamicQuantize"] > 0 and ops["DequantizeLinear"] > 0
    assert "TRT_FP4QDQ" not in ops  # every FP4 weight was compressed
    if os.environ.get("KONTEXT_KEEP_EXPORT"):
        shutil.copy(path, os.environ["KONTEXT_KEEP_EXPORT"])
