"""Export the (calibrated) Kontext transformer to ONNX, per the engine contract.

Named inputs and output (contract.INPUT_NAMES -> "out"), dynamic batch and token axes, opset 20.
ModelOpt's quantizers emit their Q/DQ nodes (TensorRT's FP8 Q/DQ ops) and QuantAttention emits
ModelOpt's FP8 attention pattern, through the TorchScript exporter ModelOpt's ONNX symbolics are
written for (as NVIDIA's own diffusers export does). Models over 2 GB go to external data in one
file beside the .onnx.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .contract import INPUT_NAMES, OUTPUT_NAME
from .tokens import example_inputs

OPSET = 20
TWO_GB = 2 * 1024**3

DYNAMIC_AXES = {
    "img": {0: "batch", 1: "image_tokens"}, "img_ids": {0: "batch", 1: "image_tokens"},
    "txt": {0: "batch", 1: "text_tokens"}, "txt_ids": {0: "batch", 1: "text_tokens"},
    "timesteps": {0: "batch"}, "y": {0: "batch"}, "guidance": {0: "batch"},
    OUTPUT_NAME: {0: "batch", 1: "image_tokens"},
}


def export_onnx(model, path: str | Path, batch: int = 1, target: tuple[int, int] = (4, 4), n_txt: int = 8) -> Path:
    """Write `model` to `path` (+ `path.data` when it is over 2 GB); returns path.

    The trace runs one forward on example inputs of the given size on the model's device; every
    token and batch axis stays dynamic in the graph.
    """
    path = Path(path)
    param = next(model.parameters())
    x = example_inputs(model.config, batch=batch, target=target, references=[target], n_txt=n_txt,
                       dtype=model.dtype, device=param.device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    workdir = Path(tempfile.mkdtemp(prefix="kontext_onnx_", dir=path.parent))
    try:
        raw = workdir / "model.onnx"
        with torch.inference_mode():
            torch.onnx.export(model, tuple(x[name] for name in INPUT_NAMES), str(raw), input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        if size < TWO_GB:
            shutil.move(str(raw), path)
        else:
            import onnx

            # The exporter writes one file per initializer; one data file is what people can move around.
            proto = onnx.load(str(raw), load_external_data=True)
            onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def remove_onnx(path: str | Path) -> None:
    """Remove an exported model and its external data."""
    path = Path(path)
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)
