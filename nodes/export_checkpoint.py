"""Export Checkpoint: an engine's calibrated model as one ComfyUI-native file in models/diffusion_models."""
from pathlib import Path

from comfy_api.latest import io

import folder_paths

from ..engines.comfy_export import export_comfy_checkpoint
from ..engines.source_weights import open_checkpoint
from .folders import FOLDER, engine_store
from .load_quantized import STATE_SUFFIX, FROM_ENGINE, engine_checkpoint
from .lora import lora_names


class KontextExportCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_ExportCheckpoint",
            display_name="Kontext TRT: Export ComfyUI Checkpoint",
            category="Kontext TRT",
            description="Writes an engine's calibrated model as one .safetensors in ComfyUI's mixed-precision layout "
                        "(FP8 weights with their calibrated input scales) into models/diffusion_models: stock Load "
                        "Diffusion Model runs it on ComfyUI 0.8 (and 0.3.64's scaled FP8), and Load Quantized Model "
                        "runs it alone with FP8 attention.",
            is_output_node=True,
            inputs=[
                io.Combo.Input("engine", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="An engine built by Build Engine, with its calibrated state beside it."),
                io.Combo.Input("checkpoint", options=[FROM_ENGINE, *folder_paths.get_filename_list("diffusion_models")],
                               default=FROM_ENGINE, tooltip="The checkpoint the engine was built from (checked)."),
                io.String.Input("filename", default="", tooltip="Output file name in models/diffusion_models; empty: "
                                                                  "the engine's name + .safetensors."),
            ],
            outputs=[io.String.Output("checkpoint_name", tooltip="The written file, for Load Diffusion Model.")],
        )

    @classmethod
    def execute(cls, engine, checkpoint, filename) -> io.NodeOutput:
        path = Path(folder_paths.get_full_path_or_raise(FOLDER, engine))
        meta = engine_store().read_metadata(path)
        if meta.get("loras"):
            raise ValueError(f"engine {engine}: built with LoRA baked in ({lora_names(meta['loras'])}); the export "
                             "writes the checkpoint's own weights, which lack it. Export an engine built without LoRA "
                             "and apply the LoRA after Load Diffusion Model / Load Quantized Model")
        state = path.with_name(path.stem + STATE_SUFFIX)
        if not state.is_file():
            raise FileNotFoundError(f"engine {engine}: its calibrated state {state.name} is missing; rebuild it")
        name = (filename.strip() or f"{path.stem}.safetensors")
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"filename: expected a plain file name ending in .safetensors, got {filename!r}")
        source = engine_checkpoint(engine, meta, checkpoint)  # the weights the engine was calibrated from, checked
        out = Path(folder_paths.get_folder_paths("diffusion_models")[0]) / name
        with open_checkpoint(source) as weights:
            export_comfy_checkpoint(weights, state, out, source=meta.get("source"))
        return io.NodeOutput(name)
