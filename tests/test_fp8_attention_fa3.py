"""FlashAttention-3's FP8 attention with the pack's patch (engines/fp8_attention_fa3.py, scripts/build_fa3_fp8.sh).

Here: the choice of kernel and the errors for what the kernel cannot take. On a Hopper GPU with the library
built (marked cuda): its outputs against FP32 attention of the same FP8 inputs and against the Triton kernel,
the promotion of P x V on flat rows, CUDA graph capture, and FP8Attention attending through it. Building the
library: when FA3_SOURCE and CUTLASS_SOURCE name checkouts at the script's commits and nvcc is found."""
import ctypes.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engines.fp8 import FP8_MAX, quantize_fp8
from engines.fp8_attention_fa3 import (ATTENTION_KERNELS, FA3FP8Attention, check_inputs, default_library,
                                       resolve_fa3_library)

ROOT = Path(__file__).resolve().parents[1]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_fa3 = pytest.mark.skipif(not (HOPPER and default_library().is_file()),
                               reason=f"needs a Hopper GPU and {default_library()} (scripts/build_fa3_fp8.sh)")


def test_triton_and_auto_need_nothing_flashattention3_says_why_it_cannot_run():
    cpu = torch.device("cpu")
    assert resolve_fa3_library("triton", cpu) is None
    assert resolve_fa3_library("auto", cpu) is None
    with pytest.raises(ValueError, match="'flashattention3' cannot run: it needs a CUDA GPU, the model is on cpu"):
        resolve_fa3_library("flashattention3", cpu)
    with pytest.raises(ValueError, match=r"attention_kernel must be one of \('auto', 'triton', 'flashattention3'\), "
                                         r"got 'fa3'"):
        resolve_fa3_library("fa3", cpu)
    assert ATTENTION_KERNELS[0] == "auto"


def test_the_library_path_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KONTEXT_TRT_FA3_LIBRARY", str(tmp_path / "x.so"))
    assert default_library() == tmp_path / "x.so"
    monkeypatch.delenv("KONTEXT_TRT_FA3_LIBRARY")
    assert default_library() == ROOT / "build" / "fa3_fp8_attention_sm90.so"


def test_a_missing_or_foreign_library_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.so does not exist"):
        FA3FP8Attention(tmp_path / "missing.so")
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load as a library without the kernel's symbol")
    path = next((p for p in (Path("/lib/x86_64-linux-gnu") / libm, Path("/usr/lib") / libm) if p.is_file()), None)
    if path is None:
        pytest.skip(f"{libm} not found on disk")
    with pytest.raises(ValueError, match="has no symbol kontext_fa3_fp8_attention"):
        FA3FP8Attention(path)


def test_inputs_the_kernel_cannot_take_are_refused_by_name():
    q8 = torch.zeros(1, 2, 64, 128, dtype=torch.float8_e4m3fn)
    scales = torch.ones(3)
    with pytest.raises(ValueError, match=r"q8 must be \[B, H, L, 128\], got \(1, 2, 64, 64\)"):
        check_inputs(q8[..., :64], q8, q8, scales)
    with pytest.raises(ValueError, match=r"v8 has shape \(1, 2, 128, 64\), expected \(1, 2, 64, 128\)"):
        check_inputs(q8, q8, q8.transpose(-1, -2), scales)
    with pytest.raises(ValueError, match="q8 must be float8_e4m3fn on q8's CUDA device, got torch.float8_e4m3fn on cpu"):
        check_inputs(q8, q8, q8, scales)


# --- on a Hopper GPU with the library built ---

HEADS = 4


def fp8_inputs(seq_len, qk_std=2.0, flat=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, seq_len, 128, device="cuda", generator=g) * s for s in (qk_std, qk_std, 1.0))
    if flat:  # every key scores the same: each output is the mean of V's column
        q, v = torch.zeros_like(q), torch.rand(v.shape, device="cuda", generator=g) * 0.5 + 0.5
    scales = torch.stack([t.abs().max().clamp_min(1e-3) / FP8_MAX for t in (q, k, v)]).float()
    q8, k8, v8 = (quantize_fp8(t, s) for t, s in zip((q, k, v), scales))
    exact = F.scaled_dot_product_attention(*(t.float() * s for t, s in zip((q8, k8, v8), scales))).transpose(1, 2)
    return q8, k8, v8, scales, exact


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@needs_fa3
@pytest.mark.parametrize("seq_len", [1000, 4351])
def test_gpu_fa3_is_as_close_to_fp32_attention_as_the_triton_kernel(seq_len):
    from engines.fp8_attention import quantize_transposed_for_kernel
    from engines.fp8_attention_triton import fp8_attention

    q8, k8, v8, scales, exact = fp8_inputs(seq_len)
    got = FA3FP8Attention(default_library())(q8, k8, v8, scales)
    triton = fp8_attention(q8, k8, quantize_transposed_for_kernel(v8.float() * scales[2], scales[2]), scales,
                           torch.bfloat16)
    assert got.shape == (1, seq_len, HEADS, 128) and got.dtype == torch.bfloat16
    # P on the FP8 grid is the error's main part (~0.9%); the two kernels round it against different running
    # maxima (FlashAttention-3 walks the keys last block first), so they differ from each other by about as much.
    assert rel(got, exact) < 1.1 * rel(triton, exact) + 1e-3
    assert rel(got, exact) < 0.015


@pytest.mark.cuda
@needs_fa3
def test_gpu_fa3_promotes_p_v_so_flat_rows_keep_their_mean():
    # Stock FlashAttention-3 (every key's P x V in the FP8 MMA's accumulator) reads 0.978 of the mean at 2560
    # keys, 0.863 at 8704 on an H100 (benchmarks/results/kernels/attention_speed_fa3_experiment_h100.json).
    q8, k8, v8, scales, exact = fp8_inputs(8704, flat=True)
    got = FA3FP8Attention(default_library())(q8, k8, v8, scales)
    assert abs(got.float().mean().item() / exact.mean().item() - 1) < 0.003


@pytest.mark.cuda
@needs_fa3
def test_gpu_fa3_replays_in_a_cuda_graph():
    q8, k8, v8, scales, _ = fp8_inputs(2048)
    attention = FA3FP8Attention(default_library())
    eager = attention(q8, k8, v8, scales)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention(q8, k8, v8, scales)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q8, k8, v8, scales)
    scales.mul_(1.5)  # the scales are read from the device at each replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, attention(q8, k8, v8, scales))
    assert not torch.equal(captured, eager)


@pytest.mark.cuda
@needs_fa3
def test_gpu_fp8_attention_attends_through_fa3_when_given_the_library():
    from engines.fp8_attention import FP8Attention
    from test_fp8_attention_inputs import make_streams

    streams, pe = make_streams([64, 900], batch=1, device="cuda", seed=2)
    streams = [(q.repeat(1, 1, 1, 4), k.repeat(1, 1, 1, 4), v.repeat(1, 1, 1, 4), norm) for q, k, v, norm in streams]
    attention = FP8Attention(torch.tensor(0.03), torch.tensor(0.03), torch.tensor(0.05)).cuda()
    for q, k, v, norm in streams:  # head width 128 (the test module's is 32): norms over 128
        norm.query_norm.scale.data = norm.query_norm.scale.data.repeat(4)
        norm.key_norm.scale.data = norm.key_norm.scale.data.repeat(4)
    triton = attention.attend(streams, pe.repeat_interleave(4, dim=3))
    attention.fa3_library = str(default_library())
    fa3 = attention.attend(streams, pe.repeat_interleave(4, dim=3))
    assert fa3.shape == triton.shape and rel(fa3, triton) < 0.03
    attention.fa3_library = "/nonexistent/fa3.so"  # the path is taken, not silently left for Triton's
    with pytest.raises(FileNotFoundError):
        attention.attend(streams, pe.repeat_interleave(4, dim=3))


FA3_SOURCE, CUTLASS_SOURCE = os.environ.get("FA3_SOURCE"), os.environ.get("CUTLASS_SOURCE")


def test_build_script_refuses_an_unknown_argument():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build_fa3_fp8.sh"), "--bogus"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "unknown argument '--bogus'" in result.stderr


@pytest.mark.skipif(not (FA3_SOURCE and CUTLASS_SOURCE and (shutil.which("nvcc") or os.environ.get("NVCC"))),
                    reason="FA3_SOURCE and CUTLASS_SOURCE (checkouts) and nvcc are needed to build the library")
def test_build_script_builds_the_library_with_the_kernel_symbol(tmp_path):
    out = tmp_path / "fa3.so"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build_fa3_fp8.sh"), "--flash-attention", FA3_SOURCE,
                             "--cutlass", CUTLASS_SOURCE, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fa3.so"]  # no temporary file left beside it
    symbols = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    assert " T kontext_fa3_fp8_attention" in symbols
