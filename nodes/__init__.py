"""ComfyUI nodes of Kontext TRT: thin glue that validates inputs, calls `engines`, wraps outputs."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .build_engine import KontextBuildEngine
from .edit_turn import KontextEditHistory, KontextEditTurn
from .export_checkpoint import KontextExportCheckpoint
from .folders import register_tensorrt_folder
from .load_quantized import KontextLoadQuantized
from .model_info import KontextModelInfo

NODES: list[type[io.ComfyNode]] = [KontextModelInfo, KontextBuildEngine, KontextLoadQuantized, KontextExportCheckpoint,
                                   KontextEditTurn, KontextEditHistory]


class KontextTRTExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_tensorrt_folder()
        return NODES


async def comfy_entrypoint() -> KontextTRTExtension:
    return KontextTRTExtension()
