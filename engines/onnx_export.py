"""Export the (calibrated) Kontext transformer to ONNX, per the engine contract.

Named inputs and output (contract.INPUT_NAMES -> "out"), dynamic batch and token axes, opset 20.
ModelOpt's quantizers emit their Q/DQ nodes (TensorRT's FP8 Q/DQ ops) and QuantAttention emits
ModelOpt's FP8 attention pattern, through the TorchScript exporter ModelOpt's ONNX symbolics are
written for (as NVIDIA's own diffusers export does). Models over 2 GB are written by the exporter
with external data: one file per weight, beside the .onnx in the same folder (TensorRT's parser
reads them; keep the folder together). Not repacked into one file: that loads all 22 GiB of the
full model into memory a second time (measured: 46 GiB peak instead of 24).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .contract import INPUT_NAMES, OUTPUT_NAME
from .tokens import example_inputs

OPSET = 20

DYNAMIC_AXES = {
    "img": {0: "batch", 1: "image_tokens"}, "img_ids": {0: "batch", 1: "image_tokens"},
    "txt": {0: "batch", 1: "text_tokens"}, "txt_ids": {0: "batch", 1: "text_tokens"},
    "timesteps": {0: "batch"}, "y": {0: "batch"}, "guidance": {0: "batch"},
    OUTPUT_NAME: {0: "batch", 1: "image_tokens"},
}


def export_onnx(model, path: str | Path, batch: int = 1, target: tuple[int, int] = (4, 4), n_txt: int = 8) -> Path:
    """Write `model` to `path`, with external weight files beside it when it is over 2 GB.

    The trace runs one forward on example inputs of the given size on the model's device; every
    token and batch axis stays dynamic in the graph. Give it a folder of its own.
    """
    path = Path(path)
    param = next(model.parameters())
    x = example_inputs(model.config, batch=batch, target=target, references=[target], n_txt=n_txt,
                       dtype=model.dtype, device=param.device)
    with torch.inference_mode():
        torch.onnx.export(model, tuple(x[name] for name in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return path
