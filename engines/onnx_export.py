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

import contextlib
import importlib
from pathlib import Path

import torch

from .contract import INPUT_NAMES, OUTPUT_NAME
from .tokens import example_inputs

OPSET = 20
# ModelOpt's NVFP4 exporter; importing it imports ModelOpt's "onnx" extra (onnx-graphsurgeon, onnxslim, lief).
NVFP4_EXPORTER = "modelopt.onnx.export.nvfp4_exporter"

DYNAMIC_AXES = {
    "img": {0: "batch", 1: "image_tokens"}, "img_ids": {0: "batch", 1: "image_tokens"},
    "txt": {0: "batch", 1: "text_tokens"}, "txt_ids": {0: "batch", 1: "text_tokens"},
    "timesteps": {0: "batch"}, "y": {0: "batch"}, "guidance": {0: "batch"},
    OUTPUT_NAME: {0: "batch", 1: "image_tokens"},
}


class ExportDependencyMissing(RuntimeError):
    """A package the ONNX export of this recipe needs is not importable."""


def check_export_dependencies(recipe) -> None:
    """Import what exporting `recipe` will import, so a missing package fails the build before calibration
    (minutes to hours of it) rather than after."""
    if not recipe.exports_block_quantized_weights:
        return
    try:
        importlib.import_module(NVFP4_EXPORTER)
    except ImportError as e:
        raise ExportDependencyMissing(
            f"recipe {recipe.name}: its NVFP4 weights are exported by ModelOpt's NVFP4 ONNX exporter "
            f"({NVFP4_EXPORTER}), which cannot be imported: {e}. Install the pack's requirements into "
            "ComfyUI's Python (`pip install -r requirements.txt`: onnx-graphsurgeon, onnxslim and lief are "
            "ModelOpt's ONNX dependencies)") from e


def export_onnx(model, path: str | Path, batch: int = 1, target: tuple[int, int] = (4, 4), n_txt: int = 8) -> Path:
    """Write `model` to `path`, with external weight files beside it when it is over 2 GB.

    The trace runs one forward on example inputs of the given size on the model's device; every
    token and batch axis stays dynamic in the graph. Give it a folder of its own.
    """
    path = Path(path)
    param = next(model.parameters())
    x = example_inputs(model.config, batch=batch, target=target, references=[target], n_txt=n_txt,
                       dtype=model.dtype, device=param.device)
    nvfp4 = _has_block_quantizers(model)
    context = contextlib.nullcontext()
    if nvfp4:
        from modelopt.torch.quantization.export_onnx import configure_linear_module_onnx_quantizers

        # ModelOpt's NVFP4 export: weights as static FP4 Q/DQ, activations as TensorRT's dynamic FP4 quantize.
        context = configure_linear_module_onnx_quantizers(model)
    with context, torch.inference_mode():
        torch.onnx.export(model, tuple(x[name] for name in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    if nvfp4:
        _compress_nvfp4_weights(path)
    return path


def _has_block_quantizers(model) -> bool:
    from torch import nn

    return any(getattr(getattr(m, "weight_quantizer", None), "block_sizes", None) and m.weight_quantizer.is_enabled
               for m in model.modules() if isinstance(m, nn.Linear))


def _compress_nvfp4_weights(path: Path) -> None:
    """ModelOpt's NVFP4 exporter: 16-bit weights behind FP4 Q/DQ -> packed FP4 weights + two DQ (what
    TensorRT's parser takes). It works on the loaded model, so the ONNX is held in memory once here."""
    import onnx

    exporter = importlib.import_module(NVFP4_EXPORTER).NVFP4QuantExporter  # the module check_export_dependencies checks
    proto = exporter.process_model(onnx.load(str(path), load_external_data=True))
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > 2**31 - 1  # protobuf's 2 GB limit
    for f in path.parent.iterdir():
        if f != path:
            f.unlink()
    onnx.save(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data")
