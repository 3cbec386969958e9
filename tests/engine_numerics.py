"""The numbers of an exported engine graph, on a machine without TensorRT's runtime (test-time only).

`standard_qdq_copy` makes a copy of an exported quantized ONNX that ONNX Runtime's CPU provider runs: ModelOpt's
TensorRT FP8 Q/DQ nodes (`trt::TRT_FP8QuantizeLinear` / `trt::TRT_FP8DequantizeLinear`, scale in the graph's
16-bit dtype, no zero point) become ONNX's `QuantizeLinear` / `DequantizeLinear` with the same scales and a
FLOAT8E4M3FN zero point (saturating, round to nearest even: TensorRT's FP8 Q/DQ), and every 16-bit tensor, cast and
input/output becomes float32, so the copy computes the graph's quantization in float32. Engines are never built
from it: the build takes the graph as exported (engines/onnx_export.py).

Nodes the copy cannot carry are named in `StandardCopy.unmapped`, with the reason: NVFP4's (TensorRT's dynamic
FP4 quantize, and DequantizeLinear of FLOAT4E2M1 data), since ONNX Runtime's CPU provider has no FP4 kernel
(`ort_cpu_runs_fp4` checks it rather than assuming).

Written by hand because no library does this conversion as such: ModelOpt's FP8QuantExporter.post_process renames
the same nodes but also rewrites attention patterns (it moves Mul / Transpose across Q/DQ) and leaves the renamed
nodes in the `trt` domain, and neither ONNX nor ModelOpt's AutoCast converts a 16-bit graph to float32 (AutoCast
goes the other way).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

SIXTEEN_BIT = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
TRT_FP8 = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
FP8_ZERO_POINT = "standard_qdq_fp8_zero_point"
# TensorRT's names for the ONNX element types of an engine's inputs and outputs (as its parser reports them).
TENSORRT_DTYPE_NAMES = {TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16", TensorProto.FLOAT: "FLOAT"}


@dataclass
class StandardCopy:
    model: onnx.ModelProto
    mapped: list[str] = field(default_factory=list)  # TensorRT FP8 Q/DQ nodes now ONNX Q/DQ
    unmapped: dict[str, str] = field(default_factory=dict)  # node name -> why ONNX Runtime's CPU provider cannot run it


def ort_cpu_runs_fp4() -> bool:
    """Whether this ONNX Runtime's CPU provider dequantizes FLOAT4E2M1 (DequantizeLinear-23, blocked, as ModelOpt's
    NVFP4 export writes the weights)."""
    import onnxruntime as ort

    weight = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [1, 16], [0.5] * 16)
    scale = helper.make_tensor("s", TensorProto.FLOAT, [1, 1], [1.0])
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=-1, block_size=16)], "fp4",
                              [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own NotImplemented / Fail types
        if "NOT_IMPLEMENTED" in str(e) or "implementation" in str(e):
            return False
        raise
    return True


def _fp4_reason(what: str) -> str:
    import onnxruntime as ort

    return (f"{what}: FP4 (E2M1) data, which ONNX Runtime {ort.__version__}'s CPU provider has no kernel for "
            "(QuantizeLinear / DequantizeLinear / Cast with FLOAT4E2M1 are not implemented there)")


def standard_qdq_copy(proto: onnx.ModelProto) -> StandardCopy:
    """The exported graph with standard FP8 Q/DQ, computed in float32 (see the module docstring)."""
    model = copy.deepcopy(proto)
    out = StandardCopy(model)
    graph = model.graph
    fp4_tensors = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT4E2M1}
    unmapped_outputs = set()
    for node in graph.node:
        if node.domain == "trt" and node.op_type in TRT_FP8:
            node.op_type, node.domain = TRT_FP8[node.op_type], ""
            node.input.append(FP8_ZERO_POINT)
            if node.op_type == "QuantizeLinear":
                node.attribute.append(helper.make_attribute("saturate", 1))
            out.mapped.append(node.name)
        elif node.domain == "trt":
            out.unmapped[node.name] = _fp4_reason(
                f"{node.op_type} (TensorRT's NVFP4 quantize with block scales computed at run time; in standard ONNX "
                "a QuantizeLinear-23 to FLOAT4E2M1)") if "FP4" in node.op_type else f"{node.op_type}: no ONNX equivalent"
            unmapped_outputs.update(node.output)
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in fp4_tensors:
            out.unmapped[node.name] = _fp4_reason(f"{node.op_type} of the packed NVFP4 weight {node.input[0]}")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in unmapped_outputs:
            out.unmapped[node.name] = f"{node.op_type}: dequantizes an output of an unmapped node ({node.input[0]})"
    graph.initializer.append(helper.make_tensor(FP8_ZERO_POINT, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    _to_float32(graph)
    if not any(n.domain == "trt" for n in graph.node):
        kept = [o for o in model.opset_import if o.domain != "trt"]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return out


def _float32(t: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)


def _to_float32(graph: onnx.GraphProto) -> None:
    """Every 16-bit initializer, constant, cast and graph input/output in float32 (values exact: 16 -> 32 bits)."""
    for i, t in enumerate(graph.initializer):
        if t.data_type in SIXTEEN_BIT:
            graph.initializer[i].CopyFrom(_float32(t))
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in SIXTEEN_BIT:
                a.t.CopyFrom(_float32(a.t))
            elif node.op_type == "Cast" and a.name == "to" and a.i in SIXTEEN_BIT:
                a.i = TensorProto.FLOAT
    for v in list(graph.input) + list(graph.output):
        if v.type.tensor_type.elem_type in SIXTEEN_BIT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.value_info[:]  # intermediate types changed; ONNX Runtime infers them again


def io_dtype_names(proto: onnx.ModelProto) -> dict[str, str]:
    """{input/output name: TensorRT's dtype name} of an exported graph, as TensorRT's parser reports them."""
    return {v.name: TENSORRT_DTYPE_NAMES[v.type.tensor_type.elem_type]
            for v in list(proto.graph.input) + list(proto.graph.output)}


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # CI's cores; more threads only fight the other tests
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_session(session, inputs: dict[str, torch.Tensor], outputs: list[str] | None = None) -> list[torch.Tensor]:
    arrays = session.run(outputs, {k: v.detach().float().cpu().numpy() for k, v in inputs.items()})
    return [torch.from_numpy(a) for a in arrays]


# ---------------------------------------------------------------- pieces of the copy, by what they compute

def _maps(graph: onnx.GraphProto):
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def gemm_boundaries(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """{Linear module name: (its input tensor, its output tensor)} for every Linear whose weight the copy
    quantizes: the piece from the activation (before its Q/DQ, if any) to the GEMM's output with bias."""
    graph = model.graph
    producer, consumers = _maps(graph)
    weights = {t.name for t in graph.initializer}

    def only_consumer(tensor):
        found = consumers.get(tensor, [])
        if len(found) != 1:
            raise ValueError(f"ONNX copy: {tensor} feeds {[n.op_type for n in found]}, expected one node")
        return found[0]

    def activation_source(tensor):
        """The tensor before a Q/DQ pair (an input-quantized GEMM), else the tensor itself (weight-only)."""
        dq = producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer[dq.input[0]]
            if q.op_type == "QuantizeLinear" and q.input[0] not in weights:
                return q.input[0]
        return tensor

    found = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in weights or not q.input[0].endswith(".weight"):
            continue
        dq = only_consumer(q.output[0])
        gemm = only_consumer(dq.output[0])
        weight_in = dq.output[0]
        if gemm.op_type == "Transpose":
            weight_in, gemm = gemm.output[0], only_consumer(gemm.output[0])
        if gemm.op_type == "Gemm":
            found[q.input[0][:-len(".weight")]] = (activation_source(gemm.input[0]), gemm.output[0])
        elif gemm.op_type == "MatMul":
            x = next(i for i in gemm.input if i != weight_in)
            bias = only_consumer(gemm.output[0])
            if bias.op_type != "Add":
                raise ValueError(f"ONNX copy: {gemm.name} is followed by {bias.op_type}, expected the bias Add")
            found[q.input[0][:-len(".weight")]] = (activation_source(x), bias.output[0])
        else:
            raise ValueError(f"ONNX copy: the weight {q.input[0]} feeds {gemm.op_type}, expected MatMul or Gemm")
    return found


def attention_boundaries(model: onnx.ModelProto, module: str) -> tuple[str, str, str, str]:
    """(q, k, v, output) of the exported attention of `module` (e.g. "double_blocks.0.attention"): the nodes the
    exporter named under its scope, between the rotated q, k, v [B, H, L, D] and the [B, L, H*D] result."""
    graph = model.graph
    producer, consumers = _maps(graph)
    scope = "/" + "/".join(module.rsplit(".", 1)) + "/"  # the exporter's scope: /double_blocks.0/attention/
    nodes = [n for n in graph.node if n.name.startswith(scope)]
    if not nodes:
        raise ValueError(f"ONNX copy: no node under {scope}")
    inside = {o for n in nodes for o in n.output}
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    inputs = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in inside and i not in constants))
    outputs = [o for n in nodes for o in n.output if any(not c.name.startswith(scope) for c in consumers.get(o, []))]

    def fed_into(op):
        return [i for i in inputs if any(c.op_type == op and c.name.startswith(scope) for c in consumers[i])]

    k, v = fed_into("Transpose"), fed_into("Cast")  # K^T is taken inside the pattern; V is cast to the 16-bit dtype
    q = [i for i in inputs if i not in k + v]
    if not (len(q) == len(k) == len(v) == len(outputs) == 1):
        raise ValueError(f"ONNX copy: {scope} has inputs {inputs} and outputs {outputs}; expected q, k, v and one output")
    return q[0], k[0], v[0], outputs[0]


def extractor(model: onnx.ModelProto):
    """ONNX's own extractor over the shape-inferred copy: .extract_model(inputs, outputs) -> the piece between."""
    from onnx.utils import Extractor

    return Extractor(onnx.shape_inference.infer_shapes(model))


# ---------------------------------------------------------------- a calibrated tiny model, exported

@dataclass
class TinyExport:
    """The tiny model calibrated with the fp8 recipe (attention included) in a 16-bit dtype and exported, as the
    build does it; sd32: the same weights in float32, which the comparisons run in."""
    dtype: torch.dtype
    sd: dict
    sd32: dict
    recipe: object
    state: object  # the calibrated state's path
    onnx_path: object
    proto: onnx.ModelProto
    copy: StandardCopy


def export_calibrated_tiny(folder, dtype: torch.dtype) -> TinyExport:
    from engines import random_state_dict, transformer_from_state_dict
    from engines.calibrated_state import save_calibrated_state
    from engines.calibration import calibration_forward_loop
    from engines.onnx_export import export_onnx
    from engines.quantize import quantize_transformer
    from engines.recipes import load_recipe
    from quant_helpers import CFG, encoded_pairs

    sd = random_state_dict(CFG, seed=7, dtype=dtype)
    model = transformer_from_state_dict(sd)
    recipe = load_recipe("fp8")
    quantize_transformer(model, recipe, calibration_forward_loop(encoded_pairs(folder, n=3), steps=2))
    state = save_calibrated_state(model, recipe, folder / "state.calibration.safetensors")
    (folder / "onnx").mkdir()
    path = export_onnx(model, folder / "onnx" / "kontext.onnx")
    proto = onnx.load(str(path))
    return TinyExport(dtype, sd, {k: v.float() for k, v in sd.items()}, recipe, state, path, proto,
                      standard_qdq_copy(proto))


def edit_steps(cfg, size: int, n_txt: int, sigmas: list[float], seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of edit steps, one row per sigma, at a size x size target with one reference of the same size
    and n_txt text tokens: the default calibration set's first image and prompt as StandInEncoder encodes them."""
    import tempfile
    from pathlib import Path

    from engines.accuracy import edit_step_inputs
    from engines.calibration import StandInEncoder, read_calibration_set, write_default_calibration_set

    folder = Path(tempfile.mkdtemp(prefix="edit_steps_"))
    pair = StandInEncoder(cfg, n_txt=n_txt)(read_calibration_set(write_default_calibration_set(folder, size=size))[0],
                                            size)
    rows = [edit_step_inputs(pair, s, seed + i) for i, s in enumerate(sigmas)]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
