"""Compiles the pack's Triton kernels ahead of time, on the CPU, for the GPUs its users run them on, and reports
what each tile config needs there: shared memory against the GPU's per-block limit, registers and spills.

    python scripts/kernel_targets.py [--archs 89,90,120] [--out kernel_targets.json]

No GPU is needed (Triton's compiler and its bundled ptxas run on the CPU), so this is how configs tuned on an
H100 are checked for RTX 40xx (sm_89) and RTX 50xx (sm_120) cards that no machine here has. It says what
compiles and fits, not how fast it runs. tests/test_kernel_targets.py runs it.

Each kernel is compiled as a real launch specializes it: pointers 16-byte aligned, strides and sequence
lengths multiples of 16 (num_heads = 24 and the like are not), the constexprs of the pack's calls.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Largest shared memory one block may use (opt-in), bytes, per compute capability: the CUDA programming
# guide's table (99 KB on sm_89 / sm_120, 227 KB on sm_90). Only GPUs with FP8 tensor cores run these kernels.
SHARED_MEMORY_PER_BLOCK = {89: 101376, 90: 232448, 120: 101376}
GPUS = {89: "RTX 40xx / L40", 90: "H100 / H200", 120: "RTX 50xx"}


def kernel_jobs():
    """(kernel name, its JITFunction, parameter types beyond i32, constexprs, num_warps, num_stages) for every
    config the pack can launch."""
    from engines import fp8_attention_inputs_triton as inputs
    from engines import fp8_attention_triton as attention
    from engines import fp8_gemv_triton as gemv
    from engines import gelu_fp8_triton as gelu

    jobs = []
    types = dict(Q="*fp8e4nv", K="*fp8e4nv", Vt="*fp8e4nv", O="*bf16", Scales="*fp32", sm_scale_log2="fp32")
    for c in attention.CONFIGS:
        jobs.append(("fp8_attention", attention.fp8_attention_kernel, types,
                     dict(HEAD_DIM=128, QUANTIZE_P=True, PROMOTE_PV=True, **c.kwargs), c.num_warps, c.num_stages))
    types = dict(Q="*bf16", K="*bf16", V="*bf16", QNorm="*bf16", KNorm="*bf16", PE="*fp32", Scales="*fp32",
                 Q8="*fp8e4nv", K8="*fp8e4nv", Vt8="*fp8e4nv")
    for config, write_v in ((inputs.QK_CONFIG, False), (inputs.V_CONFIG, True)):
        tiles = {k: v for k, v in config.items() if k != "num_warps"}
        jobs.append(("fp8_attention_inputs", inputs.fp8_attention_inputs_kernel, types,
                     dict(HEAD_DIM=128, WRITE_V=write_v, **tiles), config["num_warps"], 3))
    types = dict(X="*bf16", W="*fp8e4nv", RowScales="*fp32", Bias="*bf16", Out="*bf16")
    for c in gemv.CONFIGS:
        jobs.append(("fp8_gemv", gemv.fp8_gemv_kernel, types, dict(BLOCK_R=gemv.MAX_ROWS, EXACT_FP32=False, **c.kwargs),
                     c.num_warps, c.num_stages))
    types = dict(Prefix="*bf16", X="*bf16", Out="*fp8e4nv", Scale="*fp32")
    block_c = gelu.tile_columns(3072, 12288)  # a single block's linear2 input: [attention | GELU(MLP)]
    jobs.append(("gelu_fp8", gelu.gelu_fp8_kernel, types,
                 dict(N_PREFIX=3072, BLOCK_R=max(1, gelu.ELEMENTS_PER_PROGRAM // block_c), BLOCK_C=block_c,
                      SIGMOID_SCALE=gelu.GELU_SIGMOID_SCALE), 4, 3))
    return jobs


def ptxas_for(arch: int) -> str:
    """The ptxas Triton itself uses for sm_<arch> (Triton 3.6 and newer ship a second one for Blackwell; 3.4
    and 3.5, which ComfyUI installs with torch 2.8 / 2.9, one for every target)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).path
    except TypeError:
        return get_ptxas().path


def compile_for(kernel, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    """One config compiled for sm_<arch>: shared bytes, whether they fit, registers, spill bytes, the MMA used."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, aligned = {}, []
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = types.get(param.name, "i32")
        if signature[param.name].startswith("*") or param.name.startswith("stride") or param.name in ("seq_len", "n", "k"):
            aligned.append(i)
    source = ASTSource(kernel, signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 (reported, not hidden: the test fails on it)
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    ptx = compiled.asm["ptx"]
    # Triton keeps no register count until a kernel is loaded on a GPU; ptxas -v on the same PTX reports it.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        gpu_name = f"sm_{arch}a" if arch in (90, 120) else f"sm_{arch}"
        report = subprocess.run([ptxas_for(arch), "-v", f"--gpu-name={gpu_name}", str(path), "-o", os.devnull],
                                capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    shared = compiled.metadata.shared
    return dict(shared_bytes=shared, fits=shared <= SHARED_MEMORY_PER_BLOCK[arch],
                registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) if spills else None,
                mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="89,90,120", help="compute capabilities, e.g. 89 (RTX 40xx), 120 (RTX 50xx)")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 turns the kernels into interpreted functions, which do not compile; unset it")
    archs = [int(a) for a in args.archs.split(",")]
    for arch in archs:
        if arch not in SHARED_MEMORY_PER_BLOCK:
            p.error(f"--archs: {arch}; known: {', '.join(map(str, SHARED_MEMORY_PER_BLOCK))}")
    import triton

    rows = []
    for name, kernel, types, constexprs, num_warps, num_stages in kernel_jobs():
        tiles = {k: v for k, v in constexprs.items() if k.startswith(("BLOCK", "HEADS", "WRITE"))}
        for arch in archs:
            row = dict(kernel=name, config=dict(tiles, num_warps=num_warps, num_stages=num_stages), arch=arch,
                       gpu=GPUS[arch], triton=triton.__version__,
                       **compile_for(kernel, types, constexprs, arch, num_warps, num_stages))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
