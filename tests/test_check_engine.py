"""scripts/check_engine.py, the user-side engine check, run against the stand-in engine on the CPU
(tests/tensorrt_standin.py: TensorRTBackend's own execute path, the exported graph computed by ONNX Runtime): it
prints the cosine per sigma and exits 0 for an engine that computes its calibrated model, 1 when the comparison
falls below the recipe's tolerance, 2 when it cannot run."""
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")

from quant_helpers import CFG  # noqa: E402
from tensorrt_standin import HostMemoryBackend, save_standin_engine, standin_tensorrt  # noqa: E402

from engines.shape_profiles import custom_profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import check_engine  # noqa: E402

PROFILES = [custom_profile(64, 96, references=1)]
ROW = re.compile(r"^\s*(\d\.\d\d)\s+(-?\d\.\d{5})\s+(\d\.\d{4})\s+(ok|BELOW TOLERANCE)$", re.M)


@pytest.fixture(scope="module")
def files(tiny_export_fp16, tmp_path_factory):
    import onnx
    from safetensors.torch import save_file

    from engines import random_state_dict

    export = tiny_export_fp16
    folder = tmp_path_factory.mktemp("check")
    checkpoint = folder / "kontext.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in export.sd.items()}, str(checkpoint))
    engine, _ = save_standin_engine(export.onnx_path, folder / "tensorrt", PROFILES, CFG, export.recipe, export.state,
                                    checkpoint)
    # An engine that computes something else than its calibrated model: the exported graph with its output negated
    # (what any engine broken past its own recipe's tolerance looks like to the check).
    broken_onnx = folder / "broken.onnx"
    proto = onnx.load(str(export.onnx_path))
    last = next(n for n in proto.graph.node if "out" in n.output)
    last.output[list(last.output).index("out")] = "out_before_negation"
    proto.graph.node.append(onnx.helper.make_node("Neg", ["out_before_negation"], ["out"]))
    onnx.save(proto, str(broken_onnx))
    broken, _ = save_standin_engine(broken_onnx, folder / "broken", PROFILES, CFG, export.recipe, export.state,
                                    checkpoint)
    other = folder / "other_kontext.safetensors"  # the same architecture, other weights
    save_file({"model.diffusion_model." + k: v for k, v in random_state_dict(CFG, seed=99, dtype=export.dtype).items()},
              str(other))
    return export, engine, checkpoint, broken, other


def run(engine, checkpoint, *extra):
    runtime = (standin_tensorrt(PROFILES, CFG), HostMemoryBackend, torch.device("cpu"))
    return check_engine.main([str(engine), str(checkpoint), *extra], runtime=runtime)


def test_an_engine_of_its_calibrated_model_passes_and_the_cosine_per_sigma_is_printed(files, capsys):
    export, engine, checkpoint, _, _ = files
    assert run(engine, checkpoint) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [float(r[0]) for r in rows] == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert all(float(r[1]) >= export.recipe.min_cosine and r[3] == "ok" for r in rows), out
    assert "against the PyTorch backend" in out and "tolerance: cosine >= 0.99 (the recipe's)" in out
    assert "96x96 with a 96x96 reference and 512 text tokens" in out and out.rstrip().endswith(
        "PASS: the engine computes what the reference computes, within the recipe's tolerance")


def test_below_the_tolerance_the_check_fails(files, capsys):
    """An engine computing something else than its calibrated model (its final layer negated)."""
    _, _, checkpoint, broken, _ = files
    assert run(broken, checkpoint, "--sigmas", "0.9", "0.3", "--pairs", "1") == 1
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert len(rows) == 2 and all(r[3] == "BELOW TOLERANCE" for r in rows) and "FAIL:" in out


def test_what_keeps_the_check_from_running_is_said(files, capsys, tmp_path):
    _, engine, checkpoint, _, other = files
    # no engine file; a checkpoint that is not there; one with other weights; this CPU machine's TensorRT and GPU
    assert check_engine.main([str(tmp_path / "missing.engine"), str(checkpoint)]) == 2
    assert "cannot check the engine: engine " in capsys.readouterr().err
    assert run(engine, tmp_path / "nothing.safetensors") == 2
    assert "nothing.safetensors: no such file" in capsys.readouterr().err
    assert run(engine, other) == 2
    assert "other_kontext.safetensors: its weights are not those engine" in capsys.readouterr().err
    assert check_engine.main([str(engine), str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "cannot check the engine:" in err and ("no TensorRT is installed" in err or "none was found" in err), err


def test_an_engine_of_a_recipe_the_pytorch_backend_does_not_run_is_held_to_the_16bit_model(files, capsys, tmp_path):
    """NVFP4 (sidecar): the reference is the 16-bit model, at the recipe's 0.97. (The stand-in computes the FP8
    graph: ONNX Runtime runs no FP4; this checks the choice of reference and tolerance.)"""
    from engines.recipes import load_recipe

    export, _, checkpoint, _, _ = files
    engine, _ = save_standin_engine(export.onnx_path, tmp_path / "tensorrt", PROFILES, CFG,
                                    load_recipe("nvfp4", attention=False), None, checkpoint)
    assert run(engine, checkpoint, "--sigmas", "0.5", "--pairs", "1") == 0
    out = capsys.readouterr().out
    assert "against the 16-bit model (kontext.safetensors: the PyTorch backend runs the fp8 recipe" in out
    assert "tolerance: cosine >= 0.97 (the recipe's)" in out and len(ROW.findall(out)) == 1
