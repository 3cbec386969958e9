"""FlashAttention-3's FP8 attention forward (Hopper, sm_90a), built with the pack's patch, called through ctypes.

The recipe's attention (FP8 Q, K, V; FP32 softmax; P on the FP8 grid with amax 1; P x V in FP8) in the kernel
built for it on Hopper: FlashAttention-3 overlaps the softmax with the tensor cores by warp specialization,
which Triton does not (docs/speed_experiments.md). Its stock FP8 path sums every key's P x V inside the FP8
MMAs' reduced-precision accumulator and puts P on a 1/256 grid; `csrc/fa3_kontext.patch` makes each key
block's P x V a fresh accumulator added in FP32 (the promotion the Triton kernel has) and P's scale the
recipe's 1/448. `scripts/build_fa3_fp8.sh` builds one shared library from FlashAttention-3's and CUTLASS's
sources with that patch; it is loaded here with ctypes, so no PyTorch headers or ABI are involved.

Layouts: q8, k8 and v8 [B, H, L, 128] (any strides, last dimension contiguous; V row-major, which the kernel
transposes in shared memory: FlashAttention-3's column-major-V path does not compile), output [B, L, H, 128]
bfloat16, as the Triton kernel writes it. Importing this module loads nothing; `FA3FP8Attention(path)` loads
the library.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .fp8 import FP8
from .fp8_attention import check_kv_shapes, check_qkv_scales

HEAD_DIM = 128
SYMBOL = "kontext_fa3_fp8_attention"
# Where scripts/build_fa3_fp8.sh writes the library, unless this variable names another.
LIBRARY_ENV = "KONTEXT_TRT_FA3_LIBRARY"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[1] / "build" / "fa3_fp8_attention_sm90.so"
# The attention kernels a loader can be asked for: "auto" takes FlashAttention-3 where it is built and the GPU
# is Hopper, else the Triton kernel.
ATTENTION_KERNELS = ("auto", "triton", "flashattention3")
# TMA (which loads the tiles) needs 16-byte-aligned base addresses and strides.
TMA_ALIGN_BYTES = 16


class FA3FP8Attention:
    """One loaded build of the patched FlashAttention-3 FP8 forward."""

    def __init__(self, library: str | Path):
        library = Path(library)
        if not library.is_file():
            raise FileNotFoundError(f"FA3FP8Attention: library {library} does not exist "
                                    "(build it with scripts/build_fa3_fp8.sh)")
        self.library = library
        lib = ctypes.CDLL(str(library))
        try:
            fn = getattr(lib, SYMBOL)
        except AttributeError:
            raise ValueError(f"FA3FP8Attention: {library} has no symbol {SYMBOL}; not a build of "
                             "scripts/build_fa3_fp8.sh") from None
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int] * 3 + [ctypes.c_longlong] * 12
                       + [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int])
        self._fn = fn

    def __call__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """q8, k8, v8 [B, H, L, 128], float8_e4m3fn on one CUDA device; scales float32 [3]
        (Q, K, V) there -> O [B, L, H, 128] bfloat16."""
        check_inputs(q8, k8, v8, scales)
        batch, heads, seq_len, _ = q8.shape
        out = torch.empty(batch, seq_len, heads, HEAD_DIM, device=q8.device, dtype=torch.bfloat16)
        lse = torch.empty(batch, heads, seq_len, device=q8.device, dtype=torch.float32)  # written, not used
        error = ctypes.create_string_buffer(512)
        num_sm = torch.cuda.get_device_properties(q8.device).multi_processor_count
        stream = torch.cuda.current_stream(q8.device).cuda_stream
        with torch.cuda.device(q8.device):
            status = self._fn(q8.data_ptr(), k8.data_ptr(), v8.data_ptr(), out.data_ptr(), lse.data_ptr(),
                              scales.data_ptr(), batch, heads, seq_len,
                              q8.stride(0), q8.stride(1), q8.stride(2),
                              k8.stride(0), k8.stride(1), k8.stride(2),
                              v8.stride(0), v8.stride(1), v8.stride(2),
                              out.stride(0), out.stride(2), out.stride(1),
                              num_sm, stream, error, len(error))
        if status != 0:
            raise RuntimeError(f"FlashAttention-3 FP8 attention ({self.library.name}) failed: "
                               f"{error.value.decode(errors='replace')}")
        return out


def check_inputs(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scales: torch.Tensor) -> None:
    """What the kernel takes, checked before a launch that would otherwise fault or read wrong memory."""
    if q8.dim() != 4 or q8.shape[-1] != HEAD_DIM:
        raise ValueError(f"FA3FP8Attention: q8 must be [B, H, L, {HEAD_DIM}], got {tuple(q8.shape)}")
    check_kv_shapes(k8, "v8", v8, q8.shape, q8.shape, "FA3FP8Attention")
    for name, t in (("q8", q8), ("k8", k8), ("v8", v8)):
        if t.dtype != FP8 or t.device.type != "cuda" or t.device != q8.device:
            raise ValueError(f"FA3FP8Attention: {name} must be float8_e4m3fn on q8's CUDA device, "
                             f"got {t.dtype} on {t.device}")
        if t.stride(-1) != 1 or t.data_ptr() % TMA_ALIGN_BYTES or any(s % TMA_ALIGN_BYTES for s in t.stride()[:-1]):
            raise ValueError(f"FA3FP8Attention: {name} needs a contiguous last dimension, a 16-byte-aligned start "
                             f"and 16-byte-multiple strides (TMA), got strides {t.stride()}")
    check_qkv_scales(scales, "FA3FP8Attention")
    if scales.device != q8.device:
        raise ValueError(f"FA3FP8Attention: scales must be on {q8.device}, got {scales.device}")


def default_library() -> Path:
    """The build the pack uses: $KONTEXT_TRT_FA3_LIBRARY, else build/fa3_fp8_attention_sm90.so in the pack."""
    return Path(os.environ[LIBRARY_ENV]) if os.environ.get(LIBRARY_ENV) else DEFAULT_LIBRARY


@functools.cache
def load_fa3(library: str) -> FA3FP8Attention:
    """One FA3FP8Attention per library path in a process (ctypes loads a library once anyway)."""
    return FA3FP8Attention(library)


def unavailable_reason(device: torch.device, library: Path) -> str | None:
    """Why the FlashAttention-3 build cannot attend on device, or None when it can: the library is compiled
    for sm_90a (H100, H200, GH200) only."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU, the model is on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return f"it is built for Hopper (compute capability 9.0), this GPU is {capability[0]}.{capability[1]}"
    if not library.is_file():
        return f"{library} is not built (scripts/build_fa3_fp8.sh, or set {LIBRARY_ENV})"
    return None


def resolve_fa3_library(attention_kernel: str, device: torch.device) -> str | None:
    """The FlashAttention-3 library FP8Attention should use for attention_kernel, or None for the Triton kernel.
    "flashattention3" where it cannot run is an error saying why; "auto" takes it only where it can."""
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
    if attention_kernel == "triton":
        return None
    library = default_library()
    why_not = unavailable_reason(device, library)
    if why_not is None:
        load_fa3(str(library))  # a library that does not load is an error here, not at the first step
        return str(library)
    if attention_kernel == "flashattention3":
        raise ValueError(f"attention_kernel 'flashattention3' cannot run: {why_not}")
    return None
