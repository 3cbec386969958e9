"""ComfyUI nodes of Kontext TRT: thin glue that validates inputs, calls `engines`, wraps outputs."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .model_info import KontextModelInfo

NODES: list[type[io.ComfyNode]] = [KontextModelInfo]


class KontextTRTExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> KontextTRTExtension:
    return KontextTRTExtension()
