"""Run a shipped workflow headless through ComfyUI's own execution engine and write its images.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/run_workflow.py [workflows/api/kontext_three_turn_edit_compare.json]
        [--out output/workflow] [--tiny auto|always|never] [--tiny-steps 4]

The workflow's loaders name real files (FLUX.1 Kontext [dev], its text encoders, VAE, an engine, an
input image). With --tiny auto (default) and any of them missing from ComfyUI's model folders, every
loader is swapped for a tiny random-weight stand-in (scripts/tiny_kontext.py) and the edit turns run
few steps at the image's own size, so the whole graph runs on a CPU; the run says so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "workflows" / "api" / "kontext_three_turn_edit_compare.json"
# loader class -> (model folder, input naming the file)
LOADER_FILES = {"UNETLoader": [("diffusion_models", "unet_name")],
                "DualCLIPLoader": [("text_encoders", "clip_name1"), ("text_encoders", "clip_name2")],
                "VAELoader": [("vae", "vae_name")],
                "KontextTRT_LoadQuantized": [("tensorrt", "engine"), ("diffusion_models", "checkpoint")],
                "LoraLoaderModelOnly": [("loras", "lora_name")],
                "LoadImage": [("input", "image")]}


def import_comfyui(path: str | None) -> None:
    if "comfy.model_management" in sys.modules:
        return
    if not path:
        raise SystemExit("COMFYUI_PATH: point it (or --comfyui) at a ComfyUI checkout; ComfyUI is not on PyPI")
    sys.path.insert(0, path)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    load_comfy_extras()


def load_comfy_extras() -> None:
    """ComfyUI's own extra nodes (comfy_extras: FluxKontextImageScale, ReferenceLatent, ...), as its main.py loads them."""
    import utils.install_util  # noqa: F401  ComfyUI's `utils` package, bound first as its main.py does (an
    # extra node's import would otherwise find comfy/utils.py as `utils` and the server-side nodes fail)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False))


def missing_files(prompt: dict) -> list[str]:
    import folder_paths

    missing = []
    for node in prompt.values():
        for folder, key in LOADER_FILES.get(node["class_type"], []):
            name = node["inputs"].get(key)
            found = (Path(folder_paths.get_input_directory()) / name).is_file() if folder == "input" else \
                folder_paths.get_full_path(folder, name) is not None
            if not found:
                missing.append(f"{folder}/{name}")
    return missing


def to_tiny(prompt: dict, steps: int) -> dict:
    import nodes

    sys.path.append(str(ROOT))  # engines/, last: ComfyUI's own `nodes` module must win over the pack's folder
    sys.path.insert(0, str(ROOT / "scripts"))
    from tiny_kontext import TINY_LOADERS, TinyKontextLora

    tiny = json.loads(json.dumps(prompt))
    for node in tiny.values():
        if node["class_type"] in TINY_LOADERS:
            name, cls = TINY_LOADERS[node["class_type"]]
            nodes.NODE_CLASS_MAPPINGS[name] = cls
            node["class_type"], node["inputs"] = name, {}
        elif node["class_type"] == "LoraLoaderModelOnly":  # a random LoRA for the tiny model, at the chosen strength
            nodes.NODE_CLASS_MAPPINGS[TinyKontextLora.__name__] = TinyKontextLora
            node["class_type"] = TinyKontextLora.__name__
            node["inputs"] = {k: v for k, v in node["inputs"].items() if k != "lora_name"}
        elif node["class_type"] == "KontextTRT_EditTurn":
            node["inputs"].update(steps=steps, resize="keep")
    return tiny


class _Server:  # what PromptExecutor reports to; headless, so progress goes nowhere
    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass


def new_executor():
    """ComfyUI's PromptExecutor with its default (classic) cache, set up as ComfyUI's main.py does. 0.8.0
    replaced cache_size with cache_args and reads cache_args["ram"] after every node, so it is given the
    values of main.py's defaults (no LRU, no RAM-pressure cache) where the signature has it."""
    import inspect

    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        return execution.PromptExecutor(_Server(), cache_type=False, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(_Server(), cache_type=False)


def execute(executor, prompt: dict, targets: list[str] | None = None):
    """Validate and run an API-format prompt the way ComfyUI's queue does; raises with ComfyUI's error.
    Reusing one executor keeps ComfyUI's cache between runs. `targets`: run only these output nodes (and
    what they need), as ComfyUI's partial execution does for a queued selection."""
    import execution

    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, targets))
    if not valid[0]:
        raise RuntimeError(f"ComfyUI refused the workflow: {valid[1]} {valid[3]}")
    executor.execute(prompt, str(uuid.uuid4()), {}, valid[2])
    if not executor.success:
        errors = [m[1] for m in executor.status_messages if m[0] == "execution_error"]
        raise RuntimeError(f"workflow failed: {errors[0].get('node_type')}: {errors[0].get('exception_message')}"
                           if errors else "workflow failed")
    return executor


def run(prompt: dict, out: Path) -> list[Path]:
    import folder_paths

    out.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out))
    executor = execute(new_executor(), prompt)
    saved = []
    for node_out in executor.history_result["outputs"].values():
        for image in node_out.get("images", []):
            if image.get("type") == "output":
                saved.append(out / image.get("subfolder", "") / image["filename"])
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", nargs="?", default=str(DEFAULT), help="an API-format workflow (workflows/api/*.json)")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--out", default=str(ROOT / "output" / "workflow"))
    p.add_argument("--tiny", choices=["auto", "always", "never"], default="auto",
                   help="swap the loaders for a tiny random-weight Kontext: when files are missing (auto), always, never")
    p.add_argument("--tiny-steps", type=int, default=4, help="sampling steps per turn on the tiny model")
    args = p.parse_args(argv)
    import_comfyui(args.comfyui)
    sys.path.insert(0, str(ROOT / "scripts"))
    from comfyui_pack import load_pack_into_comfyui

    load_pack_into_comfyui(Path(tempfile.mkdtemp()))
    prompt = json.loads(Path(args.workflow).read_text())
    missing = missing_files(prompt)
    if args.tiny == "always" or (missing and args.tiny == "auto"):
        why = "asked for" if args.tiny == "always" else f"missing: {', '.join(missing)}"
        print(f"running {Path(args.workflow).name} on the tiny random-weight Kontext ({why}); images are not "
              "meaningful, the path is", flush=True)
        prompt = to_tiny(prompt, args.tiny_steps)
    elif missing:
        raise SystemExit(f"missing model files: {', '.join(missing)} (or run with --tiny auto)")
    for path in run(prompt, Path(args.out)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
