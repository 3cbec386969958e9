"""Test-only ComfyUI custom nodes: the tiny random-weight Kontext (ComfyUI's own Flux MODEL) and the stand-in
FLUX text encoders / VAE of scripts/tiny_kontext.py as loader nodes, so a real ComfyUI server in a browser
test samples edit turns on a CPU. Linked into a test server's custom_nodes; never shipped with the pack.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Appended, not inserted: ComfyUI's own `nodes` module must win over the pack's nodes/ folder.
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "scripts"))
from tiny_kontext import TINY_LOADERS  # noqa: E402

NODE_CLASS_MAPPINGS = {name: cls for name, cls in TINY_LOADERS.values() if name != "TinyDemoImage"}
