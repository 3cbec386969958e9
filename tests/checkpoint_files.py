"""Kontext checkpoints in the layouts ComfyUI users have, written from a state dict, for the tests.

ComfyUI's fp8_scaled layout (what Comfy-Org publishes and what ComfyUI's own save writes for a scaled-FP8
model): every Linear weight FP8 E4M3 with a float32 `scale_weight` (value = weight * scale_weight) and a
`scale_input`, biases and norm scales 16-bit, and an empty `scaled_fp8` marker tensor of the FP8 dtype.
ComfyUI 0.8's mixed-precision layout: per FP8 layer `weight_scale`, `input_scale` and a `comfy_quant` uint8 tensor
holding its JSON config.
"""
import json

import torch

FP8 = torch.float8_e4m3fn


def linear_weight_keys(sd):
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]


def fp8_per_tensor(w):
    scale = w.float().abs().amax() / 448.0
    return (w.float() / scale).clamp(-448, 448).to(FP8), scale.reshape(())


def fp8_scaled_state_dict(sd, dtype=torch.bfloat16, input_scale=0.02):
    out = {}
    for k, v in sd.items():
        if k in linear_weight_keys(sd):
            layer = k[: -len(".weight")]
            out[k], out[f"{layer}.scale_weight"] = fp8_per_tensor(v)
            out[f"{layer}.scale_input"] = torch.tensor(input_scale, dtype=torch.float32)
        else:
            out[k] = v.to(dtype)
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def comfy_quant_state_dict(sd, dtype=torch.bfloat16, fmt="float8_e4m3fn", layers=None, input_scale=0.02):
    out = {}
    layers = set(layers if layers is not None else [k[: -len(".weight")] for k in linear_weight_keys(sd)])
    for k, v in sd.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and layer in layers:
            out[k], out[f"{layer}.weight_scale"] = fp8_per_tensor(v)
            out[f"{layer}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
            conf = json.dumps({"format": fmt}).encode("utf-8")
            out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[k] = v.to(dtype)
    return out


def save(sd, path, prefix="", metadata=None):
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
