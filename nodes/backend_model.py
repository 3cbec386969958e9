"""A ComfyUI MODEL over a token-level backend: ComfyUI's own Flux input handling, no 16-bit weights.

BackendFlux subclasses ComfyUI's Flux for its `_forward` (patchify, the reference-latent methods
offset / index / uxo and whatever ComfyUI adds, unpatchify) and replaces only `forward_orig`, the
token-level cut of the engine contract. It creates no layers, so the MODEL costs the backend's
memory only. What the backend cannot honour is refused, never ignored.
"""
import dataclasses

import torch

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models


class BackendUnsupported(RuntimeError):
    """A ComfyUI feature that cannot reach a quantized / compiled transformer."""


class BackendFlux(comfy.ldm.flux.model.Flux):
    def __init__(self, image_model=None, final_layer=True, dtype=None, device=None, operations=None, **kwargs):
        torch.nn.Module.__init__(self)  # not Flux.__init__: it would allocate the 16-bit layers
        self.dtype = dtype
        self.params = comfy.ldm.flux.model.FluxParams(**kwargs)
        self.patch_size = self.params.patch_size
        self.in_channels = self.params.in_channels * self.patch_size * self.patch_size
        self.out_channels = self.params.out_channels * self.patch_size * self.patch_size
        self.hidden_size, self.num_heads = self.params.hidden_size, self.params.num_heads
        self.backend = None

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):
        if control is not None:
            raise BackendUnsupported("ControlNet: its residuals are added inside the transformer blocks, which a "
                                     "quantized/compiled Kontext does not expose; use the original model")
        replaced = transformer_options.get("patches_replace", {}).get("dit", {})
        if replaced:
            raise BackendUnsupported(f"block patches ({sorted(map(str, replaced))[:3]}): they replace transformer "
                                     "blocks, which a quantized/compiled Kontext does not expose")
        if transformer_options.get("patches", {}):
            raise BackendUnsupported(f"model patches {sorted(transformer_options['patches'])}: not applied by this "
                                     "backend")
        if attn_mask is not None:
            raise BackendUnsupported("attention masks: this backend runs unmasked attention")
        if guidance is None:
            raise BackendUnsupported("guidance: this Kontext backend needs a guidance value (FluxGuidance); "
                                     "FluxDisableGuidance is not supported")
        if y is None:
            y = torch.zeros((img.shape[0], self.params.vec_in_dim), device=img.device, dtype=img.dtype)
        # ComfyUI's Flux embeds guidance as time_factor * guidance in the model's dtype (guidance arrives cast to it):
        # in BF16, 1000 * 2.5 rounds to 2496. The backend embeds in float32, so it is handed that same product.
        guidance = (guidance.to(img.dtype) * 1000.0).float() / 1000.0
        out = self.backend(img, img_ids, txt, txt_ids, timesteps.float(), y, guidance)
        return out.to(img.dtype)


class BackendFluxModel(comfy.model_base.Flux):
    """ComfyUI's Flux model whose conditioning tensors go to the GPU once per sample, not once per step.

    ComfyUI keeps the encoded conditioning (text tokens, pooled vector, guidance, reference latents) in
    CPU memory and copies it to the GPU in every model call (BaseModel._apply_model). Those copies come
    from pageable memory, so each waits until the GPU has finished the previous step's queued work, and
    the GPU then idles until the next step's first kernels are launched. On the H100 host, at full
    Kontext size, three alternating runs each: 196.5 against 197.4 ms a step at CFG 1, 387.2 against
    390.3 at CFG 2.5 (benchmarks/comfyui_fp8_sampling.py --profile; under the profiler, which slows the
    CPU, 193.9 against 208.1): what each sync costs is the CPU's time to refill the queue (other hosts
    not measured).
    The tensors are ~10 MB; ComfyUI drops them with the conds when the sample ends."""

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        device = kwargs.get("device")
        return out if device is None else {name: conds_on_device(cond, device) for name, cond in out.items()}


def conds_on_device(cond, device):
    """A ComfyUI CONDRegular-family value with its tensor (or list of tensors) on device; others unchanged."""
    value = getattr(cond, "cond", None)
    if isinstance(value, torch.Tensor):
        return cond._copy_with(value.to(device))
    if isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
        return cond._copy_with([t.to(device) for t in value])
    return cond


class BackendModelPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher for a backend that is loaded and unloaded whole.

    ComfyUI's lowvram mode streams comfy.ops layers from CPU memory one at a time; FP8 buffers and a
    TensorRT engine cannot be streamed, so the MODEL always loads whole (ComfyUI frees other models
    for it first) and partial unloads become full ones, which also release a TensorRT engine.
    """

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load=True)

    def partially_unload(self, device_to, memory_to_free=0):
        return 0  # ComfyUI then unloads the whole model (LoadedModel.model_unload -> detach)

    def detach(self, unpatch_all=True):
        model = super().detach(unpatch_all)
        # unpatch_all=False is a clone of this model let go (ComfyUI swaps in the sampler's clone each sample,
        # and a collected clone detaches itself) while the model stays loaded: releasing there would throw
        # away a TensorRT context or the step's CUDA graphs every sample.
        release = getattr(self.model.diffusion_model.backend, "release", None)
        if unpatch_all and release is not None:
            release()
        return model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        if patches:
            raise BackendUnsupported("LoRA / weight patches cannot be applied to a quantized Kontext after it was built: "
                                     "apply the LoRA to the 16-bit model before building (it is baked in then)")
        return []


def flux_params_fields() -> set[str]:
    """The fields this ComfyUI's FluxParams has (0.8.0 added required ones): what the unet_config may carry."""
    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def backend_model(backend: torch.nn.Module, config, size_bytes: int, dtype, load_device, offload_device):
    """A ComfyUI MODEL (ModelPatcher) whose Flux forward runs `backend` (engine contract in, tokens out)."""
    model_config = comfy.supported_models.Flux(config.comfy_unet_config(flux_params_fields()))
    model_config.set_inference_dtype(dtype, None)
    model = BackendFluxModel(model_config, device=offload_device, unet_model=BackendFlux)
    model.diffusion_model.backend = backend
    return BackendModelPatcher(model, load_device=load_device, offload_device=offload_device, size=size_bytes)
