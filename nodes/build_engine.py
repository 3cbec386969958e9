import logging
import tempfile
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths

from ..engines.build import build_kontext_engine
from ..engines.calibration import check_encoded_pairs, read_calibration_set, write_default_calibration_set
from ..engines.gpu_support import check_build_target
from ..engines.recipes import available_recipes, load_recipe
from ..engines.shape_profiles import NAMED_PROFILES, custom_profile, named_profile
from ..engines import NotKontextError
from ..engines.calibrated_state import read_calibrated
from ..engines.comfy_export import is_exported_checkpoint
from ..engines.source_weights import from_state_dict, open_checkpoint, with_patches
from ..engines.state_dict import config_from_state_dict
from ..engines.tensorrt_build import EngineBuildCancelled, import_tensorrt
from .calibration_encoding import encode_pair
from .comfy_model import diffusion_model_state_dict, model_source_file
from .folders import engine_store
from .lora import describe_loras, diffusion_patches, key_patches


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
                io.Model.Input("model", tooltip="FLUX.1 Kontext [dev] as Load Diffusion Model gives it (weight dtype default): "
                                                "BFL's 16-bit file, or ComfyUI's fp8_scaled / float8_e4m3fn comfy_quant file. "
                                                "LoRAs applied to it (LoraLoaderModelOnly) are baked into the engine at "
                                                "their strengths, and calibrated with."),
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
                io.Combo.Input("checkpoint", options=["auto", *folder_paths.get_filename_list("diffusion_models")],
                               default="auto", optional=True,
                               tooltip="The file in models/diffusion_models the MODEL was loaded from, recorded in the "
                                       "engine so Load Quantized Model finds it. auto: the file whose weights are the "
                                       "MODEL's. A file whose weights differ is refused."),
            ],
            outputs=[io.String.Output("engine_name", tooltip="File name in models/tensorrt, for the loader."),
                     io.String.Output("calibrated_state", tooltip="Saved calibration (safetensors): resumes or re-exports.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, recipe, quantize_attention, profile, custom_min_side, custom_max_side,
                calibration_set, steps_per_sample, max_samples, keep_onnx, low_vram=False,
                checkpoint="auto") -> io.NodeOutput:
        patches = diffusion_patches(getattr(model, "patches", {}))
        if getattr(model, "backup", None):
            # A clone's patches (LoRAs) are merged into the weights while ComfyUI keeps it loaded: put the file's
            # weights back before they are fingerprinted and read (the LoRAs here are applied by the build).
            comfy.model_management.unload_all_models()
        weights = from_state_dict(diffusion_model_state_dict(model))  # refuses formats the pack cannot read
        config_from_state_dict({k: torch.empty(s, device="meta") for k, s in weights.shapes().items()})
        trt = import_tensorrt()  # says up front when no TensorRT is installed
        chosen = load_recipe(recipe, attention=quantize_attention)
        chosen.check_exportable()
        cc = gpu_compute_capability()
        check_build_target(chosen, trt.flavour, cc)
        shapes = custom_profile(custom_min_side, custom_max_side) if profile == "custom" else named_profile(profile)
        store = engine_store()
        store.prepare()  # a folder that cannot be written fails now, not after encoding and calibration

        source_file = model_source_file(weights, checkpoint)  # before the calibration's encoding work
        if weights.fp8_layers and source_file is None:
            raise NotKontextError(f"model: its weights are FP8 ({weights.format}) and no file in models/diffusion_models "
                                  "holds them; an FP8 model is built from the file Load Diffusion Model loaded: put it "
                                  "there, or pick it as checkpoint")
        path = folder_paths.get_full_path_or_raise("diffusion_models", source_file) if source_file else None
        embedded = None  # a checkpoint written by Export ComfyUI Checkpoint for this recipe: no calibration
        if path and is_exported_checkpoint(path):
            if patches:
                logging.info("Kontext TRT: the model has LoRAs applied: calibrating with them, not with the "
                             "calibration %s holds", source_file)
            elif read_calibrated(path)[0].to_json() == chosen.to_json():
                embedded = path
            else:
                logging.info("Kontext TRT: %s was calibrated for another recipe than %s: calibrating again",
                             source_file, chosen.name)
        samples = []
        if embedded is None:
            source = calibration_set.strip()
            if not source:
                source = write_default_calibration_set(Path(tempfile.mkdtemp(prefix="kontext_calib_")))
            pairs = read_calibration_set(source)[:max_samples]
            samples = [encode_pair(pair, clip, vae, model) for pair in pairs]
            check_encoded_pairs(samples, steps_per_sample)  # a pair that encoded to NaN is named before the model loads

        bars = {}

        def progress(stage, done, total):
            bar = bars.setdefault(stage, comfy.utils.ProgressBar(total))
            bar.update_absolute(done, total)

        def build(weights, device=None, calibrated_from=None, source=None):
            return build_kontext_engine(weights, chosen, [shapes], samples, steps_per_sample, store,
                                        calibration_name=str(calibration_set.strip() or "default"), keep_onnx=keep_onnx,
                                        low_vram=low_vram, device=device, calibrated_from=calibrated_from,
                                        compute_capability=cc if trt.flavour == "tensorrt_rtx" else None,
                                        progress=progress, should_cancel=comfy.model_management.processing_interrupted,
                                        trt=trt, source=source, loras=loras)

        # LoRAs are merged with ComfyUI's own weight patch (calculate_weight): into the weights as the build reads
        # them (with_patches), or by ComfyUI loading the 16-bit MODEL; the sidecar records the unpatched source.
        loras = describe_loras(patches) if patches else []
        exact = {key: kp.exact for key, kp in key_patches(patches).items()}
        try:
            if weights.fp8_layers:
                # An FP8 MODEL is built from its file, read one tensor at a time: the engine then holds exactly the
                # file's weights (ComfyUI 0.3.64 holds such a model's biases rounded to FP8), and ComfyUI's copy is
                # let go first so the weights are on the GPU once.
                comfy.model_management.unload_all_models()
                device = "cpu" if low_vram else comfy.model_management.get_torch_device()
                with open_checkpoint(path) as weights:
                    result = (build(with_patches(weights, exact), device, source=weights.describe()) if patches
                              else build(weights, device, calibrated_from=embedded))
            elif patches and low_vram:
                comfy.model_management.unload_all_models()  # the weights go back to system memory, unpatched
                unpatched = from_state_dict(diffusion_model_state_dict(model), name=source_file)
                result = build(with_patches(unpatched, exact), source=dict(weights.describe(), name=source_file))
            else:
                if low_vram:
                    comfy.model_management.unload_all_models()  # the weights go back to system memory
                else:
                    comfy.model_management.load_models_gpu([model], force_full_load=True)  # LoRAs merged here
                unpatched_source = dict(weights.describe(), name=source_file) if patches else None
                result = build(from_state_dict(diffusion_model_state_dict(model), name=source_file),
                               source=unpatched_source)
        except EngineBuildCancelled:
            raise comfy.model_management.InterruptProcessingException()
        return io.NodeOutput(result.engine.name, str(result.calibrated_state or ""))
