"""compile_blocks' Inductor options survive a second process: what a ComfyUI restart does with a warm
Inductor cache. With multi-kernel graphs loaded from Inductor's on-disk graph cache, torch 2.11 fails as
the second process loads them (see REDUCTION_CHOICE)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A LayerNorm + modulation over 3072 channels, as the blocks run them: above Inductor's own limit for
# persistent reductions, so the multi-kernel in REDUCTION_CHOICE is what compiles it.
COMPILE_AND_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from engines.runtime_torch import REDUCTION_CHOICE
norm = torch.compile(lambda x, w: torch.nn.functional.layer_norm(x, (3072,)) * w + 1, options=REDUCTION_CHOICE)
x = torch.randn(2048, 3072, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
torch.testing.assert_close(norm(x, w), torch.nn.functional.layer_norm(x, (3072,)) * w + 1, rtol=2e-2, atol=2e-2)
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's multi-kernel compiles Triton kernels: CUDA")
def test_blocks_compile_again_in_a_second_process_with_the_same_inductor_cache(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    for process in ("first", "second"):
        run = subprocess.run([sys.executable, "-c", COMPILE_AND_RUN, str(ROOT)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{process} process: {run.stderr[-2000:]}"
