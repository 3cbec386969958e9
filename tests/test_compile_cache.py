"""The compiled blocks' reductions (engines/inductor_choices.py): a LayerNorm over Flux's 3072 channels
compiles to a persistent kernel, and compiles again in a second process from Inductor's graph cache (what
a ComfyUI restart does; Inductor's multi-kernel, used before for the same kernels, failed there on torch
2.11)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton reductions: CUDA")


def layer_norm_modulated(x, w):
    return torch.nn.functional.layer_norm(x, (3072,)) * w + 1


@pytest.mark.cuda
@needs_cuda
def test_layer_norm_rows_of_3072_compile_persistent_with_the_packs_choices():
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from engines.inductor_choices import with_persistent_rows

    x = torch.randn(2048, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    sources = {}
    for name, wrap in (("inductor", lambda f: f), ("pack", with_persistent_rows)):
        torch._dynamo.reset()
        with config.patch(fx_graph_cache=False):
            out, code = run_and_get_code(wrap(torch.compile(layer_norm_modulated)), x, w)
        torch.testing.assert_close(out, layer_norm_modulated(x, w), rtol=2e-2, atol=2e-2)
        sources[name] = "\n".join(code)
    # Inductor alone loops over rows this long (so the test sees the choice), the pack's choices hold them.
    assert "triton_red_fused" in sources["inductor"] and "triton_per_fused" not in sources["inductor"]
    assert "triton_per_fused" in sources["pack"] and "triton_red_fused" not in sources["pack"]


COMPILE_AND_RUN = """
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from torch._dynamo.utils import counters
from engines.inductor_choices import with_persistent_rows
from test_compile_cache import layer_norm_modulated
norm = with_persistent_rows(torch.compile(layer_norm_modulated))
x = torch.randn(2048, 3072, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
torch.testing.assert_close(norm(x, w), layer_norm_modulated(x, w), rtol=2e-2, atol=2e-2)
print("graph cache hits:", counters["inductor"]["fxgraph_cache_hit"])
"""


@pytest.mark.cuda
@needs_cuda
def test_the_compiled_norm_loads_from_inductors_cache_in_a_second_process(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    hits = []
    for process in ("first", "second"):
        run = subprocess.run([sys.executable, "-c", COMPILE_AND_RUN, str(ROOT)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{process} process: {run.stderr[-2000:]}"
        hits.append(int(run.stdout.split("graph cache hits:")[-1]))
    assert hits[0] == 0 and hits[1] >= 1, hits
