"""Damaged engines and sidecars in the engine folder: the build that meets one says so and builds again (it never
returns it as cached), and the loader refuses it, naming the file and what to do. Also: an engine replaced on disk
after the loader checked it, and the engine's hash remembered so a 12 GB file is not read at every load.

Entries are finished real builds (reliability_fixtures.built_store); the rebuilds run the real calibration
(resumed from the saved state) with stand-ins for the ONNX export and TensorRT's builder: what is tested is that
the rebuild happens and what it leaves, not what TensorRT compiles (test_reliability_process.py builds for real).
"""
import json
import logging
import os
import re
import shutil

import pytest
from reliability_fixtures import sha256

import fault_children
from engines.engine_store import EngineStore, EngineStoreError


def overwrite_in_place(path, data):
    with open(path, "r+b") as f:
        f.write(data)


ENGINE_DAMAGE = {
    "cut_in_half": lambda engine, other: engine.write_bytes(engine.read_bytes()[:engine.stat().st_size // 2]),
    "random_bytes_same_size": lambda engine, other: overwrite_in_place(engine, os.urandom(engine.stat().st_size)),
    "emptied": lambda engine, other: engine.write_bytes(b""),
    "another_requests_engine_copied_over_it": lambda engine, other: shutil.copyfile(other, engine),
}


def edit_sidecar(change):
    def damage(sidecar):
        meta = json.loads(sidecar.read_text())
        change(meta)
        sidecar.write_text(json.dumps(meta))
    return damage


# (damage, the field or text the refusal names)
SIDECAR_DAMAGE = {
    "torn": (lambda s: s.write_text(s.read_text()[:len(s.read_text()) // 2]), "not valid JSON"),
    "not_an_object": (lambda s: s.write_text("[1, 2]"), "expected a JSON object, got list"),
    "missing_field": (edit_sidecar(lambda m: m.pop("engine_sha256")), "field 'engine_sha256' is missing"),
    "field_of_the_wrong_type": (edit_sidecar(lambda m: m.update(engine_bytes=str(m["engine_bytes"]))),
                                "field 'engine_bytes': Input should be a valid integer"),
    "nested_field_missing": (edit_sidecar(lambda m: m["tensorrt"].pop("version")), "field 'tensorrt.version' is missing"),
    "foreign_format": (edit_sidecar(lambda m: m.update(format="another-pack/2")), "field 'format'"),
}


def rebuild(root, pairs_dir):
    return fault_children.build(root, pairs_dir)


@pytest.mark.parametrize("damage", ENGINE_DAMAGE)
def test_a_damaged_engine_is_built_again_not_reused(damage, store_copy, pairs_dir, standin_export, standin_builder,
                                                    caplog):
    root, engine, other = store_copy
    ENGINE_DAMAGE[damage](engine, other)
    with caplog.at_level(logging.WARNING):
        result = rebuild(root, pairs_dir)
    assert not result.cached and len(standin_builder) == 1
    assert result.engine == engine
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["engine_sha256"] == sha256(engine) and meta["engine_bytes"] == engine.stat().st_size
    assert re.search(rf"not reusing the stored engine: .*{re.escape(engine.name)}: expected .*(bytes|sha256)",
                     caplog.text)


@pytest.mark.parametrize("damage", ENGINE_DAMAGE)
def test_the_loader_refuses_a_damaged_engine_naming_it_and_what_to_do(damage, store_copy):
    root, engine, other = store_copy
    ENGINE_DAMAGE[damage](engine, other)
    with pytest.raises(EngineStoreError, match=rf"{re.escape(engine.name)}: expected (\d+ bytes|sha256 [0-9a-f]+\.\.\.) "
                                               r"as its sidecar .*records, got .*rebuild it with Kontext TRT: Build "
                                               r"Engine .*or delete"):
        EngineStore(root).read_metadata(engine)


@pytest.mark.parametrize("damage", SIDECAR_DAMAGE)
def test_a_damaged_sidecar_is_built_again_not_reused(damage, store_copy, pairs_dir, standin_export, standin_builder,
                                                     caplog):
    root, engine, _ = store_copy
    sidecar = engine.with_suffix(".json")
    hurt, named = SIDECAR_DAMAGE[damage]
    hurt(sidecar)
    with caplog.at_level(logging.WARNING):
        result = rebuild(root, pairs_dir)
    assert not result.cached and len(standin_builder) == 1
    assert EngineStore(root).read_metadata(result.engine)["engine_sha256"] == sha256(engine)
    assert sidecar.name in caplog.text and named in caplog.text


@pytest.mark.parametrize("damage", SIDECAR_DAMAGE)
def test_the_loader_refuses_a_damaged_sidecar_naming_the_file_and_field(damage, store_copy):
    root, engine, _ = store_copy
    sidecar = engine.with_suffix(".json")
    hurt, named = SIDECAR_DAMAGE[damage]
    hurt(sidecar)
    with pytest.raises(EngineStoreError, match=rf"{re.escape(sidecar.name)}: .*{re.escape(named)}.*rebuild it with "
                                               "Kontext TRT: Build Engine"):
        EngineStore(root).read_metadata(engine)


def test_an_engine_rebuilt_under_its_name_after_loading_is_not_run_with_the_old_sidecar(store_copy, tmp_path):
    """ComfyUI keeps a loaded MODEL across prompts and the backend deserializes the engine again after every unload;
    a build that replaced the file meanwhile must not be run against the sidecar read before."""
    from types import SimpleNamespace

    from engines.config import tiny_config
    from engines.runtime_tensorrt import TensorRTBackend

    root, engine, other = store_copy
    meta = EngineStore(root).read_metadata(engine)
    deserialized = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, buffer):
            deserialized.append(len(buffer))
            return SimpleNamespace(create_execution_context=lambda *a: object())

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt = SimpleNamespace(module=SimpleNamespace(Logger=logger, Runtime=Runtime), flavour="tensorrt")
    backend = TensorRTBackend(engine, meta, trt, tiny_config())
    backend._ensure_loaded()
    backend.release()  # ComfyUI unloads the model
    shutil.copyfile(other, engine)  # a build replaces the file
    with pytest.raises(EngineStoreError, match=rf"{re.escape(engine.name)}: expected .*rebuild it"):
        backend._ensure_loaded()
    assert deserialized == [meta["engine_bytes"]]


def test_the_engine_hash_is_read_once_per_version_of_the_file(store_copy, monkeypatch):
    import engines.engine_store as store_module

    root, engine, _ = store_copy
    store = EngineStore(root)
    store.read_metadata(engine)  # hashes the copy (its inode is new) and records the hash beside it
    # a new ComfyUI session: only the record on disk is left
    monkeypatch.setattr(store_module, "_HASHED", {}, raising=False)
    reads = []
    real_open = open

    def counting_open(path, *a, **k):
        if str(path) == str(engine):
            reads.append(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(store_module, "open", counting_open, raising=False)
    store.read_metadata(engine)
    store.read_metadata(engine)
    assert reads == []  # neither load read the engine
    stat = engine.stat()
    os.utime(engine, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten later, as a copy over it would
    store.read_metadata(engine)  # same bytes: accepted, after reading them
    assert reads == [engine]


def test_a_killed_owners_scratch_folder_is_removed_and_a_running_ones_kept(tmp_path):
    """What the next build, a load and ComfyUI's start run on an engine folder (scratch.remove_abandoned_scratch)."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from engines.scratch import Scratch, remove_abandoned_scratch

    child = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from engines.scratch import Scratch; "
        "s = Scratch(sys.argv[2]).__enter__(); (s.path / 'kontext.onnx').write_bytes(b'22 GiB at full size'); "
        "os.kill(os.getpid(), signal.SIGKILL)"), str(ROOT), str(tmp_path)])
    assert child.returncode == -signal.SIGKILL
    left = list((tmp_path / ".kontext_trt" / "scratch").glob("*/kontext.onnx"))
    assert len(left) == 1  # what a killed build leaves until someone looks
    with Scratch(tmp_path) as running:
        (running.path / "kontext.onnx").write_bytes(b"being exported")
        assert remove_abandoned_scratch(tmp_path) == [left[0].parent]
        assert (running.path / "kontext.onnx").is_file()
    assert list((tmp_path / ".kontext_trt" / "scratch").iterdir()) == []  # its own folder and lock go with it
