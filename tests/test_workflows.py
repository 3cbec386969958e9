"""The shipped workflows: each UI-format file (what people drag in; ComfyUI lists workflows/*.json as the
pack's templates) has an API-format twin with the same nodes, links and widget values, and a note."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("kontext_build_fp8_engine", "kontext_three_turn_edit_quantized", "kontext_three_turn_edit_compare",
         "kontext_three_turn_edit_lora")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_its_api_twin_agree(name):
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 100  # says what to do
    ui_links = {(str(to), n["inputs"][slot]["name"]): [str(src), src_slot]
                for _, src, src_slot, to, slot, _ in ui["links"] for n in [nodes[str(to)]]}
    api_links = {(k, i): v for k, node in api.items() for i, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links
    for k, node in api.items():
        for value in node["inputs"].values():
            if not isinstance(value, list):
                assert value in nodes[k]["widgets_values"], (k, value)
    assert ui["last_link_id"] == len(ui["links"]) and ui["version"] == 0.4


def test_templates_folder_holds_only_ui_workflows():
    # ComfyUI serves <pack>/workflows/*.json as templates; the API twins live one folder down.
    assert sorted(p.stem for p in (ROOT / "workflows").glob("*.json")) == sorted(NAMES)
