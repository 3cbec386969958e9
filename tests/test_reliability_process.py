"""Builds that die, race, or run out of room, on real builds of the tiny model (ModelOpt calibration, ONNX export,
TensorRT-RTX's builder on this CPU):

- a child process killed with SIGKILL at each stage of a build, then the next identical request in this process: it
  gives the engine a clean build gives, and leaves nothing of the killed build behind;
- two identical builds at once: the second waits for the first and returns its engine; TensorRT builds once;
- a full disk (a small tmpfs, where this machine lets the tests mount one): refused before calibration when the
  folder is too small for the estimate, and a clean error with nothing kept when it fills during the build;
- a folder that cannot be written, or is a file: refused before calibration;
- keep_onnx on a rebuild of a request whose ONNX was kept before.
"""
import json
import os
import signal
import subprocess
import time

import pytest
from reliability_fixtures import sha256
from store_helpers import store_files

import fault_children
from engines.engine_store import EngineStore, EngineStoreError

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds engines on the CPU")

CHILD_LIMIT_S = 600  # only a hung child reaches it


@pytest.fixture(scope="module")
def reference(built_store):
    """What a clean build of the children's request gives: its engine's name and request key."""
    _, engine, _ = built_store
    return engine.name, json.loads(engine.with_suffix(".json").read_text())["request_key"]


def wait_for(condition, process, what: str):
    deadline = time.monotonic() + CHILD_LIMIT_S
    while not condition():
        if not process.is_alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def entry_files(engine):
    return sorted([engine.name, engine.with_suffix(".json").name, engine.stem + ".calibration.safetensors"])


@pytest.mark.parametrize("kill_at", ["calibrate", "save_state", "after_export", "build_engine", "save_engine",
                                     "save_sidecar"])
def test_after_a_build_killed_at_any_stage_the_next_request_builds_cleanly(kill_at, reference, pairs_dir, tmp_path):
    root = tmp_path / "tensorrt"
    child = fault_children.context().Process(target=fault_children.build_and_die, args=(str(root), str(pairs_dir), kill_at))
    child.start()
    child.join(CHILD_LIMIT_S)
    assert child.exitcode == -signal.SIGKILL, f"the child was to die by SIGKILL at {kill_at}, got exit {child.exitcode}"

    result = fault_children.build(root, pairs_dir)  # the next identical request
    name, key = reference
    assert result.engine.name == name and not result.cached
    meta = json.loads(result.engine.with_suffix(".json").read_text())
    assert meta["request_key"] == key
    assert meta["engine_sha256"] == sha256(result.engine) and meta["engine_bytes"] == result.engine.stat().st_size
    assert store_files(root) == entry_files(result.engine)  # no ONNX, no .partial, no scratch folder left


def test_two_identical_builds_at_once_build_one_engine(pairs_dir, tmp_path):
    root, signals = tmp_path / "tensorrt", tmp_path / "signals"
    signals.mkdir()
    ctx = fault_children.context()

    def start(name, pause):
        p = ctx.Process(target=fault_children.build_and_report, args=(str(root), str(pairs_dir), str(signals), name, pause))
        p.start()
        return p

    first = start("first", True)
    try:
        assert wait_for((signals / "first.paused").exists, first, "the first build to pause"), "the first build died"
        second = start("second", False)  # the same request, while the first is calibrating
        waited = wait_for((signals / "second.waiting").exists, second, "the second build to wait")
    finally:
        (signals / "go").touch()
    first.join(CHILD_LIMIT_S)
    second.join(CHILD_LIMIT_S)
    assert first.exitcode == 0 and second.exitcode == 0
    assert waited, "the second build did not wait for the first"
    results = {n: json.loads((signals / f"{n}.json").read_text()) for n in ("first", "second")}
    assert results["first"] == {"engine": results["second"]["engine"], "cached": False}
    assert results["second"]["cached"]
    assert sorted(p.name for p in signals.glob("*.built")) == ["first.built"]  # TensorRT built once
    engine = root / os.path.basename(results["first"]["engine"])
    meta = EngineStore(root).read_metadata(engine)
    assert meta["engine_sha256"] == sha256(engine)
    assert store_files(root) == entry_files(engine)


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(size: str, read_only: bool = False):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the disk-full and "
                        "read-only cases need one (root, in a container allowed to mount)")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_folder_too_small_for_the_build_is_refused_before_calibration(mount_tmpfs, pairs_dir, refuse_calibration):
    # The tiny model's 16-bit weights are 2.4 MiB: the build needs about 3.6 MiB by the pack's estimate.
    root = mount_tmpfs("2m") / "tensorrt"
    with pytest.raises(EngineStoreError, match=rf"engine folder {root}: the build needs about 3.6 MiB free \(the "
                                               r"exported ONNX and the engine\), got 2.0 MiB free"):
        fault_children.build(root, pairs_dir)


def test_a_disk_filling_during_the_build_fails_cleanly_and_keeps_nothing_half_written(mount_tmpfs, pairs_dir):
    # 6 MiB passes the estimate; the ONNX (2.6 MiB) and TensorRT-RTX's engine for the tiny model (7.3 MiB: its
    # kernels, not its weights, dominate) do not fit.
    root = mount_tmpfs("6m") / "tensorrt"
    with pytest.raises(EngineStoreError, match=rf"engine folder {root}: ran out of space in the build's stage "
                                               r"(export_onnx|build_engine|save_engine) \(.* free once this build's "
                                               r"files were removed\): free space there or choose another folder; "
                                               "nothing of this build was kept"):
        fault_children.build(root, pairs_dir)
    left = store_files(root)
    assert [f for f in left if not f.endswith(".calibration.safetensors")] == []  # the calibrated state is whole
    from engines.calibrated_state import check_calibrated_state

    for state in left:
        check_calibrated_state(root / state)


def test_a_folder_that_cannot_be_written_is_refused_before_calibration(mount_tmpfs, tmp_path, pairs_dir,
                                                                       refuse_calibration):
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is what stops it
        root = mount_tmpfs("1m", read_only=True)
    else:
        root = tmp_path / "read_only"
        root.mkdir()
        root.chmod(0o555)
    with pytest.raises(EngineStoreError, match=rf"engine folder {root}: expected a writable folder, but writing in it "
                                               r"failed \(.+\); choose a writable folder"):
        fault_children.build(root, pairs_dir)


def test_an_engine_folder_that_is_a_file_is_refused_before_calibration(tmp_path, pairs_dir, refuse_calibration):
    (tmp_path / "models").write_text("not a folder")
    root = tmp_path / "models" / "tensorrt"
    with pytest.raises(EngineStoreError, match=rf"engine folder {root}: expected a folder, but it or a folder above it "
                                               "is a file"):
        fault_children.build(root, pairs_dir)


def test_keep_onnx_on_a_rebuild_replaces_the_kept_onnx(tmp_path, pairs_dir, standin_builder):
    root = tmp_path / "tensorrt"
    first = fault_children.build(root, pairs_dir, keep_onnx=True)
    kept = root / f"{first.engine.stem}.onnx.d"
    assert (kept / "kontext.onnx").is_file()
    first.engine.unlink()  # e.g. deleted by hand: the next identical request builds again
    (kept / "kontext.onnx").write_bytes(b"the earlier export")
    second = fault_children.build(root, pairs_dir, keep_onnx=True)
    assert not second.cached and len(standin_builder) == 2
    assert (kept / "kontext.onnx").read_bytes() != b"the earlier export"
    assert [f for f in store_files(root) if not f.startswith(kept.name)] == entry_files(second.engine)


def test_after_a_checkpoint_export_killed_mid_write_the_next_leaves_only_the_checkpoint(built_store, pairs_dir, tmp_path):
    from safetensors.torch import save_file

    from engines.comfy_export import export_comfy_checkpoint
    from engines.source_weights import open_checkpoint

    _, engine, _ = built_store
    state = engine.with_name(engine.stem + ".calibration.safetensors")
    models = tmp_path / "diffusion_models"
    models.mkdir()
    source = models / "tiny_kontext.safetensors"
    sd, _ = fault_children.tiny_inputs(str(pairs_dir))
    save_file(dict(sd), str(source))
    out = models / "tiny_kontext_fp8.safetensors"
    child = fault_children.context().Process(target=fault_children.export_and_die, args=(str(source), str(state), str(out)))
    child.start()
    child.join(CHILD_LIMIT_S)
    assert child.exitcode == -signal.SIGKILL
    with open_checkpoint(source) as weights:
        export_comfy_checkpoint(weights, state, out)
    assert store_files(models) == sorted([out.name, source.name])  # no .partial of the killed export left
