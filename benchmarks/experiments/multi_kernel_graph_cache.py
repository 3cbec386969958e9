"""Compile a LayerNorm over 3072 channels with Inductor's multi-kernel in a process that may find the graph in
Inductor's on-disk cache (run it twice with one TORCHINDUCTOR_CACHE_DIR: on torch 2.11 the second run fails).
argv[1]: raw (multi-kernel), nofx (multi-kernel, graph cache off), none (Inductor defaults), src (print
CachingAutotuner.restore_after_unpickle)."""
import sys, inspect
sys.path.insert(0, ".")
import torch
from torch._inductor.runtime.triton_heuristics import CachingAutotuner
REDUCTION_CHOICE = {"triton.multi_kernel": 1}
print("torch", torch.__version__)
if sys.argv[1] == "src":
    print(inspect.getsource(CachingAutotuner.restore_after_unpickle)); raise SystemExit
opts = dict(REDUCTION_CHOICE)
if sys.argv[1] == "nofx": opts = dict(REDUCTION_CHOICE, fx_graph_cache=False)
if sys.argv[1] == "none": opts = {}
import time; t0 = time.perf_counter()
f = torch.compile(lambda x, w: torch.nn.functional.layer_norm(x, (3072,)) * w + 1, options=opts)
x = torch.randn(8704, 3072, device="cuda", dtype=torch.bfloat16); w = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
f(x, w); torch.cuda.synchronize(); print(sys.argv[1], "options", opts, "ran", round(time.perf_counter() - t0, 2), "s")
