"""What the Triton kernels' tests share: where each kind of test can run."""
import importlib
import os

import pytest
import torch

# The kernels' own GPU tests: FP8 tensor-core MMAs need compute capability >= 8.9.
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9)")


def interpreted_kernel_module(name: str):
    """The kernel module `name`, to run under Triton's CPU interpreter (conftest turns it on only where there
    is no GPU); skips the calling test elsewhere."""
    pytest.importorskip("triton", reason="Triton not installed (requirements-dev.txt pins it for this test)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel under Triton's CPU interpreter, which conftest turns on only without a GPU")
    return importlib.import_module(name)
