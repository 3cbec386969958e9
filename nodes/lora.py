"""ComfyUI's LoRA patches (ModelPatcher.patches, as LoraLoader and LoraLoaderModelOnly add them through ComfyUI's own
key mapping) in the forms engines/ takes: the FP8 backend's low-rank branches, ComfyUI's own weight patch for the
tensors kept in 16-bit, and a description (hash, strength, layers) for engine sidecars and messages."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

import comfy.lora
import comfy.weight_adapter

from ..engines.lora import InexpressiblePatch, KeyPatches, LowRankPatch, Patch

PREFIX = "diffusion_model."


def diffusion_patches(patches: Mapping) -> dict[str, list[tuple]]:
    """A ModelPatcher's patches on the transformer, by BFL key (ComfyUI's own (strength, value, strength_model,
    offset, function) entries, in order)."""
    return {k[len(PREFIX):]: list(v) for k, v in patches.items() if k.startswith(PREFIX) and v}


def engine_patch(entry: tuple) -> Patch:
    """One ComfyUI patch entry as a LowRankPatch when it is a plain LoRA on the weight, else what it is."""
    strength, value, strength_model, offset, function = entry
    if strength_model != 1.0:
        return InexpressiblePatch(f"weight-scaling (strength_model {strength_model})")
    if function is not None:
        return InexpressiblePatch("transformed (a weight function on the patch)")
    if isinstance(value, comfy.weight_adapter.LoRAAdapter):
        up, down, alpha, mid, dora_scale, reshape = value.weights
        if dora_scale is not None:
            return InexpressiblePatch("DoRA")
        if mid is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
            return InexpressiblePatch("LoRA with a mid or reshaped weight")
        # ComfyUI's LoRAAdapter.calculate_weight: strength * alpha / rank, or strength alone without an alpha
        scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
        return LowRankPatch(up, down, scale, tuple(offset) if offset is not None else None)
    if isinstance(value, comfy.weight_adapter.WeightAdapterBase):
        return InexpressiblePatch(value.name)
    if isinstance(value, list):
        return InexpressiblePatch("nested")
    return InexpressiblePatch(value[0] if len(value) == 2 else "diff")


def engine_patches(patches: Mapping[str, list[tuple]]) -> dict[str, list[Patch]]:
    return {key: [engine_patch(e) for e in entries] for key, entries in patches.items()}


def key_patches(patches: Mapping[str, list[tuple]]) -> dict[str, KeyPatches]:
    """Every key's patches for LoRAApplier.apply; the exact patch is ComfyUI's calculate_weight in float32, as its
    ModelPatcher.patch_weight_to_device computes a 16-bit model's weights."""
    def exact(key, entries):
        return lambda weight: comfy.lora.calculate_weight(entries, weight.to(torch.float32, copy=True), PREFIX + key)

    return {key: KeyPatches(tuple(engine_patch(e) for e in entries), exact(key, entries))
            for key, entries in patches.items()}


def describe_loras(patches: Mapping[str, list[tuple]]) -> list[dict]:
    """One record per LoRA in `patches` (BFL keys -> ComfyUI entries): a SHA-256 of its tensors, its strength, its
    type, how many tensors it patches and a few of its file's own key names. ComfyUI's patches carry no file name;
    the adapters of one loaded file share one set of the file's keys (comfy.lora.load_lora), which groups them."""
    groups: dict[tuple, list] = {}
    for key, entries in patches.items():
        for entry in entries:
            strength, value = entry[0], entry[1]
            loaded = getattr(value, "loaded_keys", None)
            kind = getattr(value, "name", None) or ("nested" if isinstance(value, list) else
                                                    (value[0] if len(value) == 2 else "diff"))
            group = (id(loaded) if loaded is not None else kind, strength, entry[2])
            groups.setdefault(group, []).append((key, entry, kind, loaded))
    out = []
    for (_, strength, strength_model), members in groups.items():
        h = hashlib.sha256()
        for key, entry, kind, _ in sorted(members, key=lambda m: (m[0], str(m[1][3]))):
            h.update(f"{key}|{entry[3]}|{kind}|".encode())
            for t in _tensors(entry[1]):
                h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        loaded = members[0][3]
        record = {"sha256": h.hexdigest(), "strength": float(strength), "type": members[0][2],
                  "tensors": len({m[0] for m in members}),
                  "file_keys": sorted(loaded)[:3] if loaded else []}
        if strength_model != 1.0:
            record["strength_model"] = float(strength_model)
        out.append(record)
    return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, comfy.weight_adapter.WeightAdapterBase):
        yield from _tensors(value.weights)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, (int, float)):
        yield torch.tensor(float(value))


def lora_names(loras: list[dict]) -> str:
    """A short text naming LoRAs described by describe_loras, for messages."""
    return "; ".join(f"{r['type']} {r['sha256'][:12]} at strength {r['strength']:g} on {r['tensors']} tensors"
                     f"{' (keys ' + ', '.join(r['file_keys'][:2]) + ', ...)' if r['file_keys'] else ''}" for r in loras)
