"""ONNX export and a real TensorRT-RTX engine build, on a CPU-only machine, from a tiny calibrated FP8 model."""
import sys

import pytest
import torch
from quant_helpers import CFG, encoded_pairs
from store_helpers import store_files

pytest.importorskip("modelopt.torch.quantization")
trt_rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds engines on the CPU")

from engines import INPUT_NAMES, random_state_dict  # noqa: E402
from engines.build import build_kontext_engine  # noqa: E402
from engines.engine_store import EngineStore  # noqa: E402
from engines.onnx_export import NVFP4_EXPORTER, ExportDependencyMissing  # noqa: E402
from engines.recipes import load_recipe  # noqa: E402
from engines.shape_profiles import named_profile  # noqa: E402
from engines.tensorrt_build import EngineBuildCancelled, EngineBuildError, build_engine, import_tensorrt  # noqa: E402

SM89 = (8, 9)  # Ada: TensorRT-RTX builds for it ahead of time with no GPU present


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return encoded_pairs(tmp_path_factory.mktemp("pairs"), n=2)


@pytest.fixture(scope="module")
def sd():
    return random_state_dict(CFG, dtype=torch.float16)  # FP8 attention exports from a 16-bit model


def build(sd, pairs, store, **kw):
    return build_kontext_engine(sd, load_recipe("fp8"), [named_profile("kontext_1ref")], pairs, steps=2, store=store,
                                compute_capability=SM89, trt=import_tensorrt("tensorrt_rtx"), **kw)


def files(store):
    return store_files(store.root)


def test_real_engine_from_calibrated_fp8_model(sd, pairs, tmp_path):
    store = EngineStore(tmp_path / "tensorrt")
    result = build(sd, pairs, store)
    assert not result.cached and result.engine.is_file() and result.engine.stat().st_size > 100_000
    meta = store.read_metadata(result.engine)
    # I/O names and dtypes as TensorRT parsed them, against the engine contract.
    io = meta["io"]
    assert list(io) == list(INPUT_NAMES) + ["out"]
    assert {k: v["dtype"] for k, v in io.items()} == {
        "img": "HALF", "img_ids": "FLOAT", "txt": "HALF", "txt_ids": "FLOAT", "timesteps": "FLOAT", "y": "HALF",
        "guidance": "FLOAT", "out": "HALF"}
    assert io["img"]["shape"] == [-1, -1, 64] and io["txt"]["shape"] == [-1, -1, CFG.context_in_dim]
    # Profile ranges: batch 1..2 (CFG batches cond + uncond), text 256..512, every Kontext resolution.
    profile = meta["profiles"][0]
    assert profile["batch"] == [1, 1, 2] and profile["text_tokens"] == [256, 512, 512]
    assert profile["image_tokens"][1] == 2 * 4096 and profile["image_tokens"][0] < 8192 < profile["image_tokens"][2]
    assert meta["tensorrt"]["flavour"] == "tensorrt_rtx" and meta["target"] == "8.9"
    assert meta["tensorrt"]["version"] == trt_rtx.__version__ and "build_gpu" in meta and meta["pack_version"]
    assert len(meta["model_fingerprint"]) == 64 and meta["built_at"]
    assert meta["recipe"]["name"] == "fp8" and meta["recipe"]["attention"]["q"] == "fp8_per_tensor"
    assert set(meta["stages"]) == {"calibrate", "save_calibrated_state", "export_onnx", "build_engine"}
    assert meta["engine_bytes"] == result.engine.stat().st_size
    # Nothing half-written or temporary is left: the engine, its sidecar, the calibrated state.
    names = files(store)
    assert names == sorted([result.engine.name, result.engine.with_suffix(".json").name, result.calibrated_state.name])


def test_identical_request_returns_the_cached_engine(sd, pairs, tmp_path, monkeypatch):
    store = EngineStore(tmp_path / "tensorrt")
    first = build(sd, pairs, store)

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt an engine that was already in the store")

    monkeypatch.setattr("engines.build.build_engine", no_rebuild)
    monkeypatch.setattr("engines.build.quantize_transformer", no_rebuild)
    second = build(sd, pairs, store)
    assert second.cached and second.engine == first.engine


def test_cancel_during_tensorrt_build_leaves_no_engine(sd, pairs, tmp_path):
    store = EngineStore(tmp_path / "tensorrt")
    stage = {"now": None}

    def progress(name, done, total):
        stage["now"] = name

    with pytest.raises(EngineBuildCancelled):
        build(sd, pairs, store, progress=progress, should_cancel=lambda: stage["now"] == "build_engine")
    names = files(store)
    assert not [n for n in names if n.endswith((".engine", ".json", ".onnx", ".partial"))], names
    # The calibrated state survives, so the next build resumes instead of recalibrating.
    assert any(n.endswith(".calibration.safetensors") for n in names)
    resumed = build(sd, pairs, store)
    assert "calibrate (resumed from saved state)" in store.read_metadata(resumed.engine)["stages"]


def test_failed_build_leaves_no_engine(sd, pairs, tmp_path, monkeypatch):
    store = EngineStore(tmp_path / "tensorrt")

    def fail(*a, **k):
        raise EngineBuildError("TensorRT said no")

    monkeypatch.setattr("engines.build.build_engine", fail)
    with pytest.raises(EngineBuildError, match="TensorRT said no"):
        build(sd, pairs, store)
    assert not [n for n in files(store) if n.endswith((".engine", ".json", ".onnx", ".partial"))]


def test_nvfp4_build_without_modelopts_onnx_extra_fails_before_calibration(sd, pairs, tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as a missing onnx-graphsurgeon or lief does inside ModelOpt.
    monkeypatch.setitem(sys.modules, NVFP4_EXPORTER, None)

    def no_calibration(*a, **k):
        raise AssertionError("calibrated although the export could not run")

    monkeypatch.setattr("engines.build.calibrate_or_resume", no_calibration)
    store = EngineStore(tmp_path / "tensorrt")
    with pytest.raises(ExportDependencyMissing, match=r"recipe nvfp4: .*nvfp4_exporter.*pip install -r requirements.txt"):
        build_kontext_engine(sd, load_recipe("nvfp4", attention=False), [named_profile("kontext_1ref")], pairs,
                             steps=2, store=store, compute_capability=(12, 0), trt=import_tensorrt("tensorrt_rtx"))
    assert not store.root.exists() or files(store) == []


def test_parse_failure_carries_tensorrt_text(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(EngineBuildError, match=r"could not parse .*bad.onnx: .+"):
        build_engine(bad, CFG, [named_profile("kontext_1ref")], compute_capability=SM89, trt=import_tensorrt("tensorrt_rtx"))


def test_hopper_target_is_refused_by_tensorrt_rtx_with_a_reason(tmp_path):
    from engines.tensorrt_build import compute_capability_target

    with pytest.raises(EngineBuildError, match=r"cannot build for compute capability 9.0; it targets \[.*'SM89'"):
        compute_capability_target(import_tensorrt("tensorrt_rtx"), (9, 0))


def test_sidecar_is_written_after_the_engine(sd, pairs, tmp_path):
    # An engine without its sidecar is refused by the store (what a crash between the renames leaves).
    store = EngineStore(tmp_path / "tensorrt")
    engine = build(sd, pairs, store).engine
    store.sidecar_path(engine).unlink()
    from engines.engine_store import EngineStoreError

    with pytest.raises(EngineStoreError, match="has no metadata sidecar"):
        store.read_metadata(engine)
    assert store.engines() == []


def test_nvfp4_onnx_from_the_gpu_builds_for_blackwell():
    """tests/data/tiny_nvfp4.onnx: the nvfp4 recipe (attention off) on the tiny model, calibrated and exported
    with ModelOpt's NVFP4 flow on an H100 (test_quantize_cuda.py::test_nvfp4_exports_packed_fp4_weights).
    Its FP4-packed weights parse, and TensorRT-RTX builds it for SM 12.0 (RTX 50): the FP4 layers are real."""
    from pathlib import Path

    import onnx

    from engines import tiny_config
    from engines.shape_profiles import custom_profile

    path = Path(__file__).parent / "data" / "tiny_nvfp4.onnx"
    weights = onnx.load(str(path)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT4E2M1 for w in weights)  # packed FP4, not fake-quant
    assert any(w.data_type == onnx.TensorProto.FLOAT8E4M3FN for w in weights)  # the recipe's FP8 layers
    built = build_engine(path, tiny_config(), [custom_profile(64, 128)], compute_capability=(12, 0),
                         trt=import_tensorrt("tensorrt_rtx"))
    assert len(built.serialized) > 0
    # TensorRT's own buffer, not a copy of it (a full-size engine would sit in system memory twice)
    assert type(built.serialized.obj).__name__ == "IHostMemory" and built.serialized.nbytes == built.serialized.obj.nbytes
    assert built.io["img"][0] == "HALF" and built.io["out"] == ("HALF", (-1, -1, 64))
