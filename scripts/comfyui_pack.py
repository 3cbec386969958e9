"""Load this repository into a running ComfyUI through ComfyUI's own custom-node loader (once per process)."""
from __future__ import annotations

import asyncio
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LOADED: dict = {}


def load_pack_into_comfyui(tmp_path: Path) -> dict:
    """Load the pack under a pack-like folder name (a link in tmp_path); returns its node classes by id."""
    import nodes

    if _LOADED:
        return _LOADED
    link = Path(tmp_path) / "comfyui-kontext-trt"
    link.symlink_to(ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(link))):
        raise RuntimeError("ComfyUI refused to load the pack (its log says why)")
    _LOADED.update({k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before})
    return _LOADED
