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
