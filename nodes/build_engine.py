import tempfile
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils

from ..engines.build import build_kontext_engine
from ..engines.calibration import check_encoded_pairs, read_calibration_set, write_default_calibration_set
from ..engines.gpu_support import check_build_target
from ..engines.recipes import available_recipes, load_recipe
from ..engines.shape_profiles import NAMED_PROFILES, custom_profile, named_profile
from ..engines.state_dict import config_from_state_dict, strip_prefix
from ..engines.tensorrt_build import EngineBuildCancelled, import_tensorrt
from .calibration_encoding import encode_pair
from .comfy_model import diffusion_model_state_dict
from .folders import engine_store

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def gpu_compute_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


class KontextBuildEngine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_BuildEngine",
            display_name="Kontext TRT: Build Engine",
            category="Kontext TRT",
            description="Calibrates the Kontext transformer with ModelOpt on prompt / image pairs and compiles a "
                        "TensorRT engine into models/tensorrt. An identical request returns the engine it built before.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 Kontext [dev] as Load Diffusion Model gives it, weight dtype default (16-bit)."),
                io.Clip.Input("clip", tooltip="FLUX text encoders (CLIP-L + T5-XXL): encode the calibration prompts."),
                io.Vae.Input("vae", tooltip="FLUX VAE: encodes the calibration images into reference latents."),
                io.Combo.Input("recipe", options=available_recipes(), default="fp8",
                               tooltip="fp8: Ada / Hopper / Blackwell. nvfp4, svdquant_nvfp4: Blackwell only."),
                io.Boolean.Input("quantize_attention", default=True,
                                 tooltip="Q, K, V and softmax output in FP8 per the recipe; off keeps attention 16-bit."),
                io.Combo.Input("profile", options=[*NAMED_PROFILES, "custom"], default="kontext_1ref",
                               tooltip="Shapes the engine accepts. kontext_1ref: target + 1 reference at every Kontext "
                                       "resolution, batch 1-2 (CFG), 256-512 text tokens. custom: the sides below."),
                io.Int.Input("custom_min_side", default=512, min=256, max=4096, step=16,
                             tooltip="custom profile: smallest image side in pixels."),
                io.Int.Input("custom_max_side", default=1568, min=256, max=4096, step=16,
                             tooltip="custom profile: largest image side in pixels."),
                io.String.Input("calibration_set", default="",
                                tooltip="Folder of <name>.png + <name>.txt pairs, or a .json list of {image, prompt}. "
                                        "Empty: the pack's default set (12 edits)."),
                io.Int.Input("steps_per_sample", default=8, min=1, max=50,
                             tooltip="Sampling steps per calibration pair: activations are collected at each."),
                io.Int.Input("max_samples", default=12, min=1, max=512, tooltip="Use at most this many pairs."),
                io.Boolean.Input("low_vram", default=False,
                                 tooltip="For cards smaller than the 16-bit model (22 GiB): weights stay in system "
                                         "memory, calibration streams one block at a time to the GPU, export runs on "
                                         "the CPU. fp8 recipe only."),
                io.Boolean.Input("keep_onnx", default=False, tooltip="Keep the exported ONNX beside the engine."),
            ],
            outputs=[io.String.Output("engine_name", tooltip="File name in models/tensorrt, for the loader."),
                     io.String.Output("calibrated_state", tooltip="Saved calibration (safetensors): resumes or re-exports.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, recipe, quantize_attention, profile, custom_min_side, custom_max_side,
                calibration_set, steps_per_sample, max_samples, keep_onnx, low_vram=False) -> io.NodeOutput:
        sd = strip_prefix(diffusion_model_state_dict(model))
        config_from_state_dict(sd)  # refuses anything that is not a Flux / Kontext transformer
        dtypes = {t.dtype for t in sd.values()}
        if not dtypes <= set(SIXTEEN_BIT):
            raise ValueError(f"model: expected 16-bit weights (bf16 / fp16) to calibrate from, got {sorted(map(str, dtypes))}; "
                             "load it with weight_dtype 'default'")
        trt = import_tensorrt()  # says up front when no TensorRT is installed
        chosen = load_recipe(recipe, attention=quantize_attention)
        chosen.check_exportable()
        cc = gpu_compute_capability()
        check_build_target(chosen, trt.flavour, cc)
        shapes = custom_profile(custom_min_side, custom_max_side) if profile == "custom" else named_profile(profile)
        store = engine_store()
        store.prepare()  # a folder that cannot be written fails now, not after encoding and calibration

        source = calibration_set.strip()
        if not source:
            source = write_default_calibration_set(Path(tempfile.mkdtemp(prefix="kontext_calib_")))
        pairs = read_calibration_set(source)[:max_samples]
        samples = [encode_pair(pair, clip, vae, model) for pair in pairs]
        check_encoded_pairs(samples, steps_per_sample)  # a pair that encoded to NaN is named before the model loads

        if low_vram:
            comfy.model_management.unload_all_models()  # the weights go back to system memory
        else:
            comfy.model_management.load_models_gpu([model], force_full_load=True)
        sd = strip_prefix(diffusion_model_state_dict(model))
        bars = {}

        def progress(stage, done, total):
            bar = bars.setdefault(stage, comfy.utils.ProgressBar(total))
            bar.update_absolute(done, total)

        try:
            result = build_kontext_engine(sd, chosen, [shapes], samples, steps_per_sample, store,
                                          calibration_name=str(calibration_set.strip() or "default"), keep_onnx=keep_onnx,
                                          low_vram=low_vram,
                                          compute_capability=cc if trt.flavour == "tensorrt_rtx" else None,
                                          progress=progress, should_cancel=comfy.model_management.processing_interrupted,
                                          trt=trt)
        except EngineBuildCancelled:
            raise comfy.model_management.InterruptProcessingException()
        return io.NodeOutput(result.engine.name, str(result.calibrated_state or ""))
