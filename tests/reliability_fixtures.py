"""Fixtures of the fault-injection tests (test_reliability_*.py): finished engines of the tiny model to damage, and
stand-ins for the ONNX exporter and TensorRT's builder where a test only needs to know that a rebuild happened."""
import hashlib
import itertools
import shutil
from pathlib import Path

import pytest

import fault_children


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration_pairs")


@pytest.fixture(scope="session")
def built_store(tmp_path_factory, pairs_dir):
    """An engine folder holding two finished requests, built for real (ModelOpt calibration, ONNX export,
    TensorRT-RTX's builder on this CPU for compute capability 8.9): the fp8 recipe with quantized attention, and
    without. Returns (folder, engine with attention, engine without)."""
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds engines on the CPU")
    root = tmp_path_factory.mktemp("built") / "tensorrt"
    with_attention = fault_children.build(root, pairs_dir).engine
    without = fault_children.build(root, pairs_dir, attention=False).engine
    return root, with_attention, without


@pytest.fixture
def store_copy(built_store, tmp_path):
    """A private copy of built_store: (folder, engine with attention, engine without)."""
    root, with_attention, without = built_store
    copy = tmp_path / "tensorrt"
    shutil.copytree(root, copy)
    return copy, copy / with_attention.name, copy / without.name


@pytest.fixture
def standin_export(monkeypatch):
    """The ONNX export replaced by a stand-in writing a small file: for tests about what a build decides and keeps,
    not about what it compiles."""
    def export_onnx(model, path, *a, **k):
        Path(path).write_bytes(b"stand-in ONNX")
        return Path(path)
    monkeypatch.setattr("engines.build.export_onnx", export_onnx)


@pytest.fixture
def standin_builder(monkeypatch):
    """TensorRT's builder replaced by a stand-in that records each call and returns distinct bytes each time (as
    TensorRT-RTX builds of one request are not byte-identical). Returns the list of ONNX paths it was given."""
    from engines.contract import INPUT_NAMES, OUTPUT_NAME
    from engines.tensorrt_build import BuiltEngine

    calls = []
    counter = itertools.count()

    def build_engine(onnx_path, *a, **k):
        calls.append(Path(onnx_path))
        data = b"stand-in engine " + hashlib.sha256(f"{next(counter)}".encode()).digest() * 64
        io = {name: ("FLOAT" if name in ("img_ids", "txt_ids", "timesteps", "guidance") else "HALF", (-1, -1))
              for name in (*INPUT_NAMES, OUTPUT_NAME)}
        return BuiltEngine(memoryview(data), io)
    monkeypatch.setattr("engines.build.build_engine", build_engine)
    return calls


@pytest.fixture
def refuse_calibration(monkeypatch):
    """Calibration fails the test: for inputs that must be refused before it starts."""
    def refuse(*a, **k):
        raise AssertionError("calibrated although the input could be refused before")
    monkeypatch.setattr("engines.build.quantize_transformer", refuse)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
