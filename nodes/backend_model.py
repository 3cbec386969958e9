"""A ComfyUI MODEL over a token-level backend: ComfyUI's own Flux input handling, no 16-bit weights.

BackendFlux subclasses ComfyUI's Flux for its `_forward` (patchify, the reference-latent methods
offset / index / uxo and whatever ComfyUI adds, unpatchify) and replaces only `forward_orig`, the
token-level cut of the engine contract. It creates no layers, so the MODEL costs the backend's
memory only. What the backend cannot honour is refused, never ignored.

LoRA: the MODEL's state dict has the original Flux's keys (ComfyUI's LoRA key mapping reads them), so
LoraLoader hands BackendModelPatcher.add_patches patches keyed and shaped as for the 16-bit model; the
PyTorch backend applies them when ComfyUI loads the MODEL (engines/lora.py), a TensorRT engine refuses them.
"""
import dataclasses

import torch

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models

from ..engines.lora import LoRAApplier, meta_tensors
from ..engines.transformer import KontextTransformer
from .lora import PREFIX, describe_loras, diffusion_patches, engine_patches, key_patches, lora_names


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
        self.lora = None  # the PyTorch backend's LoRAApplier (None: the backend takes no patches)
        self.tensor_shapes = {}  # BFL key -> meta tensor, for a backend whose tensors are not reachable (TensorRT)
        self.baked_loras = []  # what the engine's build baked in (sidecar), for messages

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The original Flux's keys (what ComfyUI's LoRA key mapping and ModelPatcher.add_patches match patches
        against), each the backend's own tensor (FP8 weights as their FP8 data), or a meta tensor of its shape."""
        destination = {} if destination is None else destination
        tensors = self.lora.tensors() if self.lora is not None else self.tensor_shapes
        destination.update({prefix + k: t if keep_vars else t.detach() for k, t in tensors.items()})
        return destination

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

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        out = super().load(device_to, lowvram_model_memory, force_patch_weights, full_load=True)
        self.apply_lora()
        return out

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        applied = self.model.current_weight_patches_uuid
        if applied is not None and applied != self.patches_uuid and self.model.model_loaded_weight_memory > 0:
            # Another clone's LoRAs are on the loaded backend. ComfyUI would unpatch by moving the whole model to
            # the offload device and back; the LoRAs are swapped in place instead, the FP8 weights staying loaded.
            self.apply_lora()
        return super().partially_load(device_to, extra_memory, force_patch_weights)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        lora = self.model.diffusion_model.lora
        if unpatch_weights and lora is not None:
            lora.remove()
        return super().unpatch_model(device_to, unpatch_weights)

    def apply_lora(self):
        """The backend computes the original model with exactly this patcher's patches (its LoRAs)."""
        lora = self.model.diffusion_model.lora
        if lora is None:
            return
        patches = diffusion_patches(self.patches)
        if not patches:
            lora.remove()
        elif lora.applied != self.patches_uuid:
            lora.apply(key_patches(patches), applied_id=self.patches_uuid)
        self.model.current_weight_patches_uuid = self.patches_uuid

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        if not patches:
            return []
        diffusion_model = self.model.diffusion_model
        known = diffusion_model.lora if diffusion_model.lora is not None else diffusion_model.tensor_shapes
        keyed = {}
        for k, value in patches.items():
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key.startswith(PREFIX) and key[len(PREFIX):] in known:
                keyed.setdefault(key[len(PREFIX):], []).append((strength_patch, value, strength_model, offset, function))
        if keyed and diffusion_model.lora is None:
            baked = diffusion_model.baked_loras
            raise BackendUnsupported(
                f"LoRA ({lora_names(describe_loras(keyed))}): a TensorRT engine's weights are fixed when it is built, "
                f"and this engine was built {'with ' + lora_names(baked) if baked else 'without LoRA'}. Bake the LoRA "
                "in (apply it to the model given to Build Engine), or use the PyTorch backend, which applies LoRAs "
                "at run time")
        if keyed:
            diffusion_model.lora.check(engine_patches(keyed))  # refuses what it cannot apply, before any sampling
        return super().add_patches(patches, strength_patch, strength_model)

    def add_hook_patches(self, hook, patches, strength_patch=1.0, strength_model=1.0):
        if patches:
            raise BackendUnsupported("LoRA hooks (scheduled / conditioning-bound LoRA): not supported by this "
                                     "backend; apply the LoRA with LoraLoaderModelOnly instead")
        return super().add_hook_patches(hook, patches, strength_patch, strength_model)


def flux_params_fields() -> set[str]:
    """The fields this ComfyUI's FluxParams has (0.8.0 added required ones): what the unet_config may carry."""
    return {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def backend_model(backend: torch.nn.Module, config, size_bytes: int, dtype, load_device, offload_device,
                  baked_loras=()):
    """A ComfyUI MODEL (ModelPatcher) whose Flux forward runs `backend` (engine contract in, tokens out). A
    KontextTransformer backend (optionally inside a CUDAGraphedTransformer) takes LoRA patches; any other refuses
    them, naming baked_loras (what its engine's build baked in)."""
    model_config = comfy.supported_models.Flux(config.comfy_unet_config(flux_params_fields()))
    model_config.set_inference_dtype(dtype, None)
    model = BackendFluxModel(model_config, device=offload_device, unet_model=BackendFlux)
    model.diffusion_model.backend = backend
    transformer = getattr(backend, "model", backend)
    if isinstance(transformer, KontextTransformer):
        model.diffusion_model.lora = LoRAApplier(transformer)
    else:
        model.diffusion_model.tensor_shapes = meta_tensors(config)
        model.diffusion_model.baked_loras = list(baked_loras)
    return BackendModelPatcher(model, load_device=load_device, offload_device=offload_device, size=size_bytes)
