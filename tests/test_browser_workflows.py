"""A real browser loads every shipped workflow: ComfyUI (a checkout + comfyui-frontend-package) serves on
127.0.0.1 with the pack in its custom_nodes, headless Chromium (Debian's `chromium`, driven by Playwright)
opens it, loads each workflow, and no node may be of an unknown type or flagged with errors; the pack's
nodes must be in the node library. Screenshots land in output/browser/ (the test's artifacts).

Skips with the reason when ComfyUI, the frontend package, Playwright or Chromium is missing.
"""
import json
import urllib.request
from pathlib import Path

import pytest

from comfyui_browser import comfyui_server, launch_chromium, open_comfyui, require_browser_stack

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "output" / "browser"
PACK_NODES = ("KontextTRT_ModelInfo", "KontextTRT_BuildEngine", "KontextTRT_LoadQuantized",
              "KontextTRT_ExportCheckpoint", "KontextTRT_EditTurn", "KontextTRT_EditHistory")
pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = require_browser_stack()
    with comfyui_server(comfy, tmp_path_factory.mktemp("comfy_base"), {"comfyui-kontext-trt": ROOT}) as (url, info, _):
        yield url, info


def test_server_lists_the_pack_nodes_and_templates(server):
    url, info = server
    assert set(PACK_NODES) <= set(info), sorted(set(PACK_NODES) - set(info))
    templates = json.load(urllib.request.urlopen(f"{url}/workflow_templates", timeout=5))
    assert sorted(templates["comfyui-kontext-trt"]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_every_workflow_loads_in_chromium_with_no_missing_or_red_nodes(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_comfyui(browser, url, viewport=(2400, 1300))
        library = page.evaluate("(ids) => ids.filter(id => window.LiteGraph.registered_node_types[id])", list(PACK_NODES))
        assert library == list(PACK_NODES)  # the frontend's node library knows every pack node
        for path in sorted((ROOT / "workflows").glob("*.json")):
            workflow = json.loads(path.read_text())
            page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
            # Zoom to where the frontend draws node text (it hides it below ~60%), note at the top left.
            page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 0.7; c.ds.offset = [0, 300];"
                          " c.setDirty(true, true); }")
            page.wait_for_timeout(1500)
            state = page.evaluate("""() => window.app.graph._nodes.map(n => ({
                type: n.type, known: !!window.LiteGraph.registered_node_types[n.type] || n.type === 'Note',
                red: !!n.has_errors, title: n.title}))""")
            page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
            assert len(state) == len(workflow["nodes"]), (path.name, state)
            bad = [s for s in state if not s["known"] or s["red"]]
            assert not bad, (path.name, bad)
            missing_dialog = page.locator("text=/missing/i").count()
            assert missing_dialog == 0, f"{path.name}: the frontend reports missing nodes (see {ARTIFACTS})"
        browser.close()
