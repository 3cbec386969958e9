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
ROW = re.compile(r"^\s*(\d\.\d\d)\s+(\d\.\d{5})\s+(\d\.\d{4})\s+(ok|BELOW TOLERANCE)$", re.M)


@pytest.fixture(scope="module")
def files(tiny_export_fp16, tmp_path_factory):
    from safetensors.torch import save_file

    from engines import random_state_dict

    export = tiny_export_fp16
    folder = tmp_path_factory.mktemp("check")
    engine, _ = save_standin_engine(export.onnx_path, folder / "tensorrt", PROFILES, CFG, export.recipe, export.state)
    checkpoint = folder / "kontext.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in export.sd.items()}, str(checkpoint))
    other = folder / "other_kontext.safetensors"  # the same architecture, other weights
    save_file({"model.diffusion_model." + k: v for k, v in random_state_dict(CFG, seed=99, dtype=export.dtype).items()},
              str(other))
    return export, engine, checkpoint, other


def run(engine, checkpoint, *extra):
    runtime = (standin_tensorrt(PROFILES, CFG), HostMemoryBackend, torch.device("cpu"))
    return check_engine.main([str(engine), str(checkpoint), *extra], runtime=runtime)


def test_an_engine_of_its_calibrated_model_passes_and_the_cosine_per_sigma_is_printed(files, capsys):
    export, engine, checkpoint, _ = files
    assert run(engine, checkpoint) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [float(r[0]) for r in rows] == [0.9, 0.7, 0.5, 0.3, 0.1]
    assert all(float(r[1]) >= export.recipe.min_cosine and r[3] == "ok" for r in rows), out
    assert "against the PyTorch backend" in out and "tolerance: cosine >= 0.99 (the recipe's)" in out
    assert "96x96 with a 96x96 reference and 512 text tokens" in out and out.rstrip().endswith(
        "PASS: the engine computes what the reference computes, within the recipe's tolerance")


def test_below_the_tolerance_the_check_fails(files, capsys):
    """The engine against a checkpoint it was not built from: what a broken engine looks like to the check."""
    _, engine, _, other = files
    assert run(engine, other, "--sigmas", "0.9", "0.3", "--pairs", "1") == 1
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert len(rows) == 2 and all(r[3] == "BELOW TOLERANCE" for r in rows) and "FAIL:" in out


def test_what_keeps_the_check_from_running_is_said(files, capsys, tmp_path):
    _, engine, checkpoint, _ = files
    # no engine file; a checkpoint that is not there; this CPU machine's own TensorRT and GPU
    assert check_engine.main([str(tmp_path / "missing.engine"), str(checkpoint)]) == 2
    assert "cannot check the engine: engine " in capsys.readouterr().err
    assert run(engine, tmp_path / "nothing.safetensors") == 2
    assert "checkpoint " in capsys.readouterr().err
    assert check_engine.main([str(engine), str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "cannot check the engine:" in err and ("no TensorRT is installed" in err or "none was found" in err), err
