import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..engines.config import KontextConfig
from ..engines.runtime_tensorrt import TensorRTBackend, check_engine_metadata, engine_device_bytes
from ..engines.tensorrt_build import import_tensorrt
from .backend_model import backend_model
from .folders import FOLDER, engine_store


class KontextLoadEngine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_LoadEngine",
            display_name="Kontext TRT: Load Engine (TensorRT)",
            category="Kontext TRT",
            description="A Kontext TensorRT engine (made by Build Engine) as a MODEL for KSampler, CFG, FluxGuidance "
                        "and ReferenceLatent. Explains a mismatched engine (TensorRT flavour or version, GPU) before "
                        "touching GPU memory.",
            inputs=[io.Combo.Input("engine", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="An engine in models/tensorrt with its .json sidecar.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, engine) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, engine)
        meta = engine_store().read_metadata(path)
        trt = import_tensorrt(meta["tensorrt"]["flavour"])
        gpu = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        check_engine_metadata(meta, trt.flavour, trt.version, gpu, torch.cuda.get_device_name() if gpu else "")
        config = KontextConfig.from_dict(meta["model_config"])
        backend = TensorRTBackend(path, meta, trt, config)
        device = comfy.model_management.get_torch_device()
        model = backend_model(backend, config, engine_device_bytes(path), backend.dtype, load_device=device,
                              offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(model)
