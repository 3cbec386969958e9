"""Write the shipped workflows: workflows/<name>.json (ComfyUI's UI format, what a person drags in and
what ComfyUI lists as this pack's templates) and workflows/api/<name>.json (API format, for the
headless runner and the tests), from one description each.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/make_workflows.py

The UI format needs every node's inputs in ComfyUI's order (which are sockets, which are widgets, and
where the frontend adds its seed "control after generate" value), so the nodes' own definitions are
read from a ComfyUI checkout. Written by hand because ComfyUI has no API -> UI converter.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "workflows"
CHECKPOINT = "flux1-kontext-dev.safetensors"
TEXT_ENCODERS = {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors", "type": "flux"}
VAE = {"vae_name": "ae.safetensors"}
IMAGE = "kontext_example.png"
ENGINE = "kontext_fp8.engine"
LORA = "kontext_lora.safetensors"


def quantized_loader(backend: str) -> dict:
    return {"class_type": "KontextTRT_LoadQuantized", "inputs": {"engine": ENGINE, "backend": backend,
                                                                "checkpoint": CHECKPOINT, "compile": True,
                                                                "cuda_graph": True}}

INSTRUCTIONS = ("remove the people from the street", "make it dusk with warm street lights", "add light rain")


def turns(first_id: int, model: str, source: str, prefix: str) -> dict:
    graph, previous = {}, None
    for i, text in enumerate(INSTRUCTIONS):
        nid = str(first_id + i)
        inputs = {"model": [model, 0], "clip": ["2", 0], "vae": ["3", 0], "instruction": text, "seed": 100 + i,
                  "steps": 24, "guidance": 2.5, "resize": "kontext", "reference_method": "offset"}
        inputs.update({"image": [source, 0]} if previous is None else {"previous": [previous, 1]})
        graph[nid] = {"class_type": "KontextTRT_EditTurn", "inputs": inputs}
        graph[str(first_id + 10 + i)] = {"class_type": "SaveImage",
                                         "inputs": {"images": [nid, 0], "filename_prefix": f"{prefix}_turn{i + 1}"}}
        previous = nid
    graph[str(first_id + 20)] = {"class_type": "KontextTRT_EditHistory", "inputs": {"turn": [previous, 1]}}
    graph[str(first_id + 21)] = {"class_type": "SaveImage",
                                 "inputs": {"images": [str(first_id + 20), 0], "filename_prefix": f"{prefix}_history"}}
    return graph


COMMON = {"2": {"class_type": "DualCLIPLoader", "inputs": dict(TEXT_ENCODERS)},
          "3": {"class_type": "VAELoader", "inputs": dict(VAE)},
          "4": {"class_type": "LoadImage", "inputs": {"image": IMAGE}}}

WORKFLOWS = {
    "kontext_build_fp8_engine": (
        "Build an FP8 TensorRT engine from FLUX.1 Kontext [dev]\n\n1. Put flux1-kontext-dev.safetensors in "
        "models/diffusion_models, clip_l + t5xxl in models/text_encoders, ae.safetensors in models/vae.\n2. Queue. "
        "Calibration (ModelOpt, the pack's default image/instruction pairs) then the TensorRT build run inside "
        "ComfyUI; the engine lands in models/tensorrt with its .json sidecar and calibrated state.\n3. On a 24 GB "
        "card turn on low_vram. Needs an NVIDIA GPU with FP8 (RTX 40xx / 50xx, Ada/Hopper/Blackwell) and TensorRT.",
        {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINT, "weight_dtype": "default"}},
         **{k: v for k, v in COMMON.items() if k != "4"},
         "5": {"class_type": "KontextTRT_BuildEngine", "inputs": {
             "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "recipe": "fp8", "quantize_attention": True,
             "profile": "kontext_1ref", "custom_min_side": 512, "custom_max_side": 1568, "calibration_set": "",
             "steps_per_sample": 8, "max_samples": 12, "low_vram": False, "keep_onnx": False}},
         "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}),
    "kontext_three_turn_edit_quantized": (
        "Three-turn edit on the quantized model\n\n1. Build an engine first (kontext_build_fp8_engine).\n2. Pick it in "
        "Load Quantized Model (backend auto: the TensorRT engine when it runs on this GPU, else the same calibrated "
        "FP8 model through PyTorch, which needs the checkpoint).\n3. Load your image, edit the instructions, queue. "
        "Each turn edits the previous turn's latent; change turn 3's text and only turn 3 runs again.",
        {"1": quantized_loader("auto"),
         **COMMON, **turns(10, "1", "4", "kontext_quantized")}),
    "kontext_three_turn_edit_lora": (
        "Three-turn edit on the quantized model with a LoRA\n\n1. Build an engine from the model without the LoRA "
        "(kontext_build_fp8_engine).\n2. Put your Kontext LoRA in models/loras and pick it in LoraLoaderModelOnly; "
        "chain more of them to stack LoRAs, at any strength (negative too).\n3. Load Quantized Model runs on the "
        "PyTorch backend here: it applies LoRAs beside its FP8 weights, so another strength or LoRA re-runs the turns "
        "without reloading the model or compiling again. A TensorRT engine cannot take a LoRA after its build: for "
        "that backend put the LoRA before Build Engine instead (it is baked into the engine).",
        {"1": quantized_loader("pytorch"),
         "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA,
                                                               "strength_model": 0.8}},
         **COMMON, **turns(10, "5", "4", "kontext_lora")}),
    "kontext_three_turn_edit_compare": (
        "The same three turns on the original and the quantized model, side by side\n\nTop chain: FLUX.1 Kontext "
        "[dev] as loaded (16-bit). Bottom chain: the quantized model. Same seeds, instructions and settings; compare "
        "the two Edit History sheets.",
        {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINT, "weight_dtype": "default"}},
         "5": quantized_loader("auto"),
         **COMMON, **turns(10, "1", "4", "kontext_original"), **turns(40, "5", "4", "kontext_quantized")}),
}

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # ComfyUI's widget types; every other input is a socket


def node_inputs(class_type: str) -> list[tuple[str, str, dict]]:
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = "COMBO" if isinstance(value[0], list) else value[0]
            opts = dict(value[1]) if len(value) > 1 and value[1] else {}
            if kind == "COMBO" and "default" not in opts:
                opts["default"] = value[0][0] if value[0] else None  # what the frontend shows first
            out.append((name, kind, opts))
    return out


def ui_workflow(api: dict, note: str) -> dict:
    import nodes

    depth = {}

    def level(nid):
        if nid not in depth:
            links = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(s) for s in links), default=-1)
        return depth[nid]

    rows: dict[int, int] = {}
    ui_nodes, links = [], []
    outputs: dict[str, list] = {}
    for nid in sorted(api, key=int):
        d = level(nid)
        row = rows.get(d, 0)
        rows[d] = row + 1
        cls = nodes.NODE_CLASS_MAPPINGS[api[nid]["class_type"]]
        outputs[nid] = [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (t, n) in enumerate(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES))]
        ui_nodes.append({"id": int(nid), "type": api[nid]["class_type"], "pos": [60 + 420 * d, 60 + 330 * row],
                         "size": [380, 290], "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": outputs[nid],
                         "properties": {"Node name for S&R": api[nid]["class_type"]}, "widgets_values": []})
    by_id = {str(n["id"]): n for n in ui_nodes}
    for nid, node in by_id.items():
        given = api[nid]["inputs"]
        for name, kind, opts in node_inputs(node["type"]):
            value = given.get(name)
            if kind not in WIDGETS or isinstance(value, list):
                link = None
                if isinstance(value, list):
                    link = len(links) + 1
                    src, slot = value
                    links.append([link, int(src), slot, int(nid), len(node["inputs"]), kind])
                    outputs[src][slot]["links"].append(link)
                node["inputs"].append({"name": name, "type": kind, "link": link})
                continue
            if value is None:
                value = opts.get("default")
            node["widgets_values"].append(value)
            if opts.get("image_upload"):
                node["widgets_values"].append("image")  # the frontend's upload widget keeps a value
            if opts.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                node["widgets_values"].append("fixed")
    order = sorted(ui_nodes, key=lambda n: depth[str(n["id"])])
    for i, n in enumerate(order):
        n["order"] = i
    note_id = max(n["id"] for n in ui_nodes) + 1
    ui_nodes.append({"id": note_id, "type": "Note", "pos": [60, -260], "size": [760, 230], "flags": {}, "order": len(order),
                     "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note]})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
            "config": {}, "extra": {"kontext_trt": "generated by scripts/make_workflows.py"}, "version": 0.4}


def main() -> int:
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        raise SystemExit("COMFYUI_PATH: point it at a ComfyUI checkout (node definitions are read from it)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from comfyui_pack import load_pack_into_comfyui
    import asyncio
    import tempfile

    sys.path.insert(0, comfy)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False))
    load_pack_into_comfyui(Path(tempfile.mkdtemp()))
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for name, (note, api) in WORKFLOWS.items():
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        (OUT / f"{name}.json").write_text(json.dumps(ui_workflow(api, note), indent=2) + "\n")
        print("wrote", name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
