import logging
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..engines.config import KontextConfig
from ..engines.cuda_graph_step import CUDAGraphedTransformer
from ..engines.fp8_attention_fa3 import ATTENTION_KERNELS
from ..engines.runtime_tensorrt import TensorRTBackend, choose_backend, engine_device_bytes
from ..engines.runtime_torch import compile_blocks, load_fp8_transformer, transformer_bytes
from ..engines.calibrated_state import read_calibrated
from ..engines.comfy_export import is_exported_checkpoint
from ..engines.scratch import remove_abandoned_scratch
from ..engines.source_weights import file_fingerprint, open_checkpoint
from ..engines.tensorrt_build import TensorRTMissing, import_tensorrt
from .backend_model import backend_model
from .lora import lora_names
from .folders import FOLDER, engine_store

STATE_SUFFIX = ".calibration.safetensors"
FROM_ENGINE = "(engine's source)"
CHECKPOINT_ALONE = "(none: an exported checkpoint alone)"


class KontextLoadQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_LoadQuantized",
            display_name="Kontext TRT: Load Quantized Model",
            category="Kontext TRT",
            description="A quantized FLUX.1 Kontext (made by Build Engine) as a MODEL for KSampler, CFG, FluxGuidance "
                        "and ReferenceLatent: the TensorRT engine, or the same calibrated FP8 model run by PyTorch. "
                        "LoRA (LoraLoaderModelOnly after this node): applied by the PyTorch backend at any strength, "
                        "stacked; a TensorRT engine takes only the LoRAs baked in when it was built. Refuses "
                        "ControlNet and block patches.",
            inputs=[
                io.Combo.Input("engine", options=[*folder_paths.get_filename_list(FOLDER), CHECKPOINT_ALONE],
                               tooltip="An engine in models/tensorrt with its .json sidecar; or none, to run a checkpoint "
                                       "written by Export ComfyUI Checkpoint alone (PyTorch backend)."),
                io.Combo.Input("backend", options=["auto", "tensorrt", "pytorch"], default="auto",
                               tooltip="auto: the TensorRT engine when it can run on this GPU and TensorRT, else "
                                       "PyTorch (the log says why). pytorch: FP8 GEMMs on compute capability >= 8.9."),
                io.Combo.Input("checkpoint", options=[FROM_ENGINE, *folder_paths.get_filename_list("diffusion_models")],
                               default=FROM_ENGINE,
                               tooltip="PyTorch backend only: the Kontext checkpoint the engine was built from (16-bit, "
                                       "fp8_scaled or comfy_quant FP8); by default the one its build recorded. Read one "
                                       "tensor at a time; a file whose weights are not the engine's is refused."),
                io.Boolean.Input("compile", default=True,
                                 tooltip="PyTorch backend on an NVIDIA GPU: torch.compile each transformer block (fuses "
                                         "the norms, RoPE, modulation and FP8 quantization; about 2x faster steps). The "
                                         "first step at a new resolution or batch size takes tens of seconds longer."),
                io.Boolean.Input("cuda_graph", default=True, optional=True,
                                 tooltip="PyTorch backend on an NVIDIA GPU: replay small steps (batch x tokens up to "
                                         "4096, e.g. 512x512 with a reference) as one CUDA graph, captured at the "
                                         "first step of each size (two kept), so no Python runs between kernels. On "
                                         "an H100: 1.1-1.5x faster steps at 512x512; larger steps run as they are."),
                io.Combo.Input("attention_kernel", options=list(ATTENTION_KERNELS), default="auto", optional=True,
                               tooltip="PyTorch backend, FP8 attention: auto takes FlashAttention-3's FP8 kernel on a "
                                       "Hopper GPU (H100 / H200) where scripts/build_fa3_fp8.sh has built it (on an "
                                       "H100 ~3% faster steps at 1024x1024 with a reference), else the pack's Triton "
                                       "kernel. flashattention3 fails with the reason where it cannot run."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, engine, backend, checkpoint, compile=True, cuda_graph=True,
                attention_kernel="auto") -> io.NodeOutput:
        if engine == CHECKPOINT_ALONE:
            return io.NodeOutput(cls.checkpoint_alone(backend, checkpoint, compile, cuda_graph, attention_kernel))
        path = Path(folder_paths.get_full_path_or_raise(FOLDER, engine))
        remove_abandoned_scratch(path.parent)  # what builds killed mid-way left there
        meta = engine_store().read_metadata(path)  # the sidecar checked, and the engine against it
        try:
            trt = import_tensorrt(meta["tensorrt"]["flavour"])
        except TensorRTMissing as e:
            trt = e
        gpu = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        chosen, why = choose_backend(backend, meta, trt, gpu, torch.cuda.get_device_name() if gpu else "")
        logging.info("Kontext TRT: %s runs on the %s backend: %s", engine, chosen, why)
        config = KontextConfig.from_dict(meta["model_config"])
        device = comfy.model_management.get_torch_device()
        offload = comfy.model_management.unet_offload_device()
        baked = meta.get("loras") or []
        if chosen == "tensorrt":
            runner = TensorRTBackend(path, meta, trt, config)
            return io.NodeOutput(backend_model(runner, config, engine_device_bytes(path), runner.dtype, device, offload,
                                               baked_loras=baked))
        if baked:
            raise ValueError(f"engine {engine}: built with LoRA baked in ({lora_names(baked)}), which the PyTorch "
                             f"backend (chosen: {why}) cannot reproduce: it runs the checkpoint's own weights. Build the engine "
                             "from the model without LoRA and put LoraLoaderModelOnly after this node (the PyTorch "
                             "backend applies LoRAs at run time), or run this engine on the TensorRT backend")

        state = path.with_name(path.stem + STATE_SUFFIX)
        if not state.is_file():
            raise FileNotFoundError(f"engine {engine}: its calibrated state {state.name} (needed by the PyTorch backend) "
                                    "is missing; rebuild with Build Engine")
        return io.NodeOutput(pytorch_model(engine_checkpoint(engine, meta, checkpoint), state, config, compile, cuda_graph,
                                           attention_kernel))

    @classmethod
    def checkpoint_alone(cls, backend, checkpoint, compile, cuda_graph, attention_kernel):
        if backend == "tensorrt":
            raise ValueError("backend tensorrt: an exported checkpoint alone runs on the PyTorch backend; pick an engine "
                             "for TensorRT")
        if checkpoint == FROM_ENGINE:
            raise ValueError("checkpoint: with no engine, pick the exported checkpoint to run")
        path = folder_paths.get_full_path_or_raise("diffusion_models", checkpoint)
        if not is_exported_checkpoint(path):
            raise ValueError(f"checkpoint {checkpoint}: not written by Export ComfyUI Checkpoint (it has no calibrated "
                             "state in it); pick an engine built from it, or load it with Load Diffusion Model")
        _, config, _ = read_calibrated(path)
        return pytorch_model(path, path, config, compile, cuda_graph, attention_kernel)


def pytorch_model(checkpoint_path, state, config, compile, cuda_graph, attention_kernel):
    """The PyTorch backend's MODEL: the checkpoint's weights with the calibrated state (a file, or the checkpoint's own
    header)."""
    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with open_checkpoint(checkpoint_path) as weights:
        runner = load_fp8_transformer(weights, state, device=device, dtype=dtype, attention_kernel=attention_kernel)
        if compile and device.type == "cuda":
            compile_blocks(runner)
        elif compile:
            logging.warning("Kontext TRT: compile is on, but %s is not a CUDA device: the blocks run uncompiled", device)
        if cuda_graph and device.type == "cuda":
            runner = CUDAGraphedTransformer(runner)
        elif cuda_graph:
            logging.warning("Kontext TRT: cuda_graph is on, but %s is not a CUDA device: steps run without CUDA graphs",
                            device)
        return backend_model(runner, config, transformer_bytes(runner), dtype, device, offload)


def engine_checkpoint(engine: str, meta: dict, checkpoint: str) -> str:
    """The path of the checkpoint the PyTorch backend reads: the one the build recorded, or the one picked, and only
    if its weights are those the engine was calibrated from (its fingerprint)."""
    source = meta.get("source") or {}
    name = source.get("name") if checkpoint == FROM_ENGINE else checkpoint
    if not name:
        raise ValueError(f"engine {engine}: its sidecar records no source checkpoint (built from a MODEL that no file in "
                         "models/diffusion_models held, or by an older version of the pack): pick the checkpoint with "
                         "its weights, or rebuild it")
    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise FileNotFoundError(f"engine {engine} was built from {name}, which is not in models/diffusion_models: put it "
                                "there, or pick the checkpoint it was built from")
    got = file_fingerprint(path)
    if got != meta["model_fingerprint"]:
        raise ValueError(f"checkpoint {name}: its weights are not those engine {engine} was calibrated from "
                         f"({source.get('name') or 'its source'}, {source.get('format', '?')}); fingerprints "
                         f"{got[:12]} and {meta['model_fingerprint'][:12]}. Pick {source.get('name') or 'that file'}, "
                         "or build an engine from this checkpoint")
    return path
