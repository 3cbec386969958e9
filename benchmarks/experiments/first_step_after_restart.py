"""First compiled FP8 step at 1024^2 + reference in this process, caches as the environment leaves them.
argv[1]: "default" (pick_reductions=False) or anything else (compile_blocks' default). Run twice per mode with
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR shared by the two processes: the second is a ComfyUI restart.
COMFYUI_PATH=... python benchmarks/experiments/first_step_after_restart.py rows"""
import sys, time, os, json
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch
sys.path.insert(0, os.environ["COMFYUI_PATH"])
from engines.quantize import use_eager_fp8_fake_quant
use_eager_fp8_fake_quant()
import step_speed
from engines import KONTEXT_DEV, random_state_dict
from engines.runtime_torch import compile_blocks
device = torch.device("cuda")
sd = random_state_dict(KONTEXT_DEV, seed=0, dtype=torch.bfloat16, device=device)
model = step_speed.fp8_model(sd, device, attention=True)
compile_blocks(model, pick_reductions=sys.argv[1] != "default")
x = step_speed.step_inputs(KONTEXT_DEV, 1024, True, 1, device)
with torch.no_grad():
    t = time.perf_counter(); model(**x); torch.cuda.synchronize(); first = time.perf_counter() - t
    t = time.perf_counter(); model(**x); torch.cuda.synchronize(); second = time.perf_counter() - t
print(json.dumps(dict(mode=sys.argv[1], first_step_s=round(first, 2), second_step_s=round(second, 3))), flush=True)
