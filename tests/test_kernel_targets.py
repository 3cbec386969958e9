"""The pack's Triton kernels compile for the RTX cards its users have, checked ahead of time on the CPU.

No machine here has an RTX 40xx (sm_89) or 50xx (sm_120): their tile configs were tuned on an H100 and a
config that needs more shared memory than such a card gives one block (99 KB), or that Triton cannot lower
for it, would fail at a user's first sample. scripts/kernel_targets.py compiles every config the pack can
launch with Triton's own compiler and ptxas, which run without a GPU. The same compile for the H100 (sm_90a)
guards the tile it runs fastest against register spills.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSUMER_ARCHS = (89, 120)
HOPPER = 90


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton", reason="Triton not installed (requirements-dev.txt pins it for this test)")
    out = tmp_path_factory.mktemp("targets") / "targets.json"
    # A fresh interpreter: conftest turns on Triton's interpreter (no GPU here), under which kernels do not compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_targets.py"),
                          "--archs", ",".join(map(str, (*CONSUMER_ARCHS, HOPPER))), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_config_compiles_and_fits_on_rtx_cards(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"fp8_attention", "fp8_attention_inputs", "fp8_gemv", "gelu_fp8"}
    assert {r["arch"] for r in compiled} == {*CONSUMER_ARCHS, HOPPER}
    for row in compiled:
        where = (row["kernel"], row["config"], row["arch"])
        assert "error" not in row, (where, row.get("error"))
        assert row["fits"], (where, row["shared_bytes"])
        assert row["registers"] is not None, where  # ptxas reported on it


def test_fp8_kernels_use_tensor_cores_on_rtx_cards(compiled):
    for row in compiled:
        if row["kernel"] in ("fp8_attention", "fp8_gemv") and row["arch"] in CONSUMER_ARCHS:
            assert row["mma"] == "mma.sync", (row["kernel"], row["config"], row["arch"], row["mma"])


def test_attention_has_a_config_without_register_spills_on_rtx_cards(compiled):
    """The H100's fastest tile (64 x 128, 4 warps) spills on these targets; the autotuner, timing every config at
    the first call, needs at least one that does not."""
    for arch in CONSUMER_ARCHS:
        spills = [r["spill_bytes"] for r in compiled if r["kernel"] == "fp8_attention" and r["arch"] == arch]
        assert spills and min(spills) == 0, (arch, spills)


def test_the_h100s_attention_tile_stays_on_wgmma_without_spills(compiled):
    """The config the H100 measured fastest (the first candidate: 64 x 128, 4 warps, 3 stages; 254 registers
    there) compiles to wgmma with no register spills: a kernel change that adds live values would spill and slow
    the H100's step, and this shows it without a GPU."""
    first = next(r for r in compiled if r["kernel"] == "fp8_attention" and r["arch"] == HOPPER)
    assert first["config"] == dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3), first["config"]
    assert first["mma"] == "wgmma" and first["spill_bytes"] == 0, first
