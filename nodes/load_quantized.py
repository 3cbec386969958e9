import os

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..engines.runtime_torch import load_fp8_transformer, transformer_bytes
from ..engines.state_dict import checkpoint_prefix
from .backend_model import backend_model
from .folders import FOLDER

STATE_SUFFIX = ".calibration.safetensors"


def calibrated_states() -> list[str]:
    return sorted(f for d in folder_paths.get_folder_paths(FOLDER) if os.path.isdir(d)
                  for f in os.listdir(d) if f.endswith(STATE_SUFFIX))


def state_path(name: str) -> str:
    for d in folder_paths.get_folder_paths(FOLDER):
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    raise FileNotFoundError(f"calibrated_state: {name!r} is not in {folder_paths.get_folder_paths(FOLDER)}")


class KontextLoadQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_LoadQuantized",
            display_name="Kontext TRT: Load Quantized Model (PyTorch)",
            category="Kontext TRT",
            description="FLUX.1 Kontext with FP8 weights from a calibrated state (made by Build Engine), run by "
                        "PyTorch: real FP8 GEMMs on GPUs with compute capability >= 8.9. Works with KSampler, CFG, "
                        "FluxGuidance and ReferenceLatent; refuses LoRA, ControlNet and block patches.",
            inputs=[
                io.Combo.Input("calibrated_state", options=calibrated_states(),
                               tooltip="A *.calibration.safetensors from models/tensorrt (fp8 recipe)."),
                io.Combo.Input("checkpoint", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The FLUX.1 Kontext [dev] checkpoint the state was calibrated from; read one "
                                       "tensor at a time, never held in 16-bit."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, calibrated_state, checkpoint) -> io.NodeOutput:
        from safetensors import safe_open

        device = comfy.model_management.get_torch_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with safe_open(folder_paths.get_full_path_or_raise("diffusion_models", checkpoint), framework="pt") as f:
            prefix = checkpoint_prefix(f.keys())
            backend = load_fp8_transformer(lambda key: f.get_tensor(prefix + key), state_path(calibrated_state),
                                           device=device, dtype=dtype)
        model = backend_model(backend, backend.config, transformer_bytes(backend), dtype, load_device=device,
                              offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(model)
