import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The pack is imported two ways: by ComfyUI as a package named after its folder, and here, where
# `engines` (relative imports only) is imported from the repository root. pytest runs with
# --import-mode=importlib so it never imports the root __init__.py, which needs ComfyUI.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Without a GPU, Triton kernels run under Triton's CPU interpreter. It is chosen when a kernel is defined
# and read from the environment once, so it is set here, before any test imports Triton.
try:
    import torch

    if not torch.cuda.is_available():
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

# The fault-injection tests' fixtures (session-scoped real builds shared by several files).
pytest_plugins = ["reliability_fixtures"]


# The tiny model calibrated (fp8 recipe, attention included) and exported in a 16-bit dtype, once per test session:
# the numerics, stand-in engine and check-script tests all read it (tests/engine_numerics.py).
import pytest  # noqa: E402

_TINY_EXPORTS = {}


def _tiny_export(tmp_path_factory, dtype):
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("onnxruntime")
    if dtype not in _TINY_EXPORTS:
        from engine_numerics import export_calibrated_tiny

        _TINY_EXPORTS[dtype] = export_calibrated_tiny(tmp_path_factory.mktemp(f"tiny_export_{str(dtype)[6:]}"), dtype)
    return _TINY_EXPORTS[dtype]


@pytest.fixture(scope="session", params=["float16", "bfloat16"])
def tiny_export(request, tmp_path_factory):
    """Exported from FP16 and from BF16 (BFL's checkpoint, hence most users' engines)."""
    import torch

    return _tiny_export(tmp_path_factory, getattr(torch, request.param))


@pytest.fixture(scope="session")
def tiny_export_fp16(tmp_path_factory):
    import torch

    return _tiny_export(tmp_path_factory, torch.float16)
