"""A real browser loads every shipped workflow: ComfyUI (a checkout + comfyui-frontend-package) serves on
127.0.0.1 with the pack in its custom_nodes, headless Chromium (Debian's `chromium`, driven by Playwright)
opens it, loads each workflow, and no node may be of an unknown type or flagged with errors; the pack's
nodes must be in the node library. Screenshots land in output/browser/ (the test's artifacts).

Skips with the reason when ComfyUI, the frontend package, Playwright or Chromium is missing.
"""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comfyui_checkout import find_comfyui

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "output" / "browser"
PACK_NODES = ("KontextTRT_ModelInfo", "KontextTRT_BuildEngine", "KontextTRT_LoadQuantized",
              "KontextTRT_ExportCheckpoint", "KontextTRT_EditTurn", "KontextTRT_EditHistory")
pytestmark = pytest.mark.comfyui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfyui_server(tmp_path_factory):
    comfy, why = find_comfyui()
    if comfy is None:
        pytest.skip(why)
    pytest.importorskip("comfyui_frontend_package", reason="ComfyUI's frontend (pip install comfyui-frontend-package)")
    pytest.importorskip("playwright.sync_api", reason="Playwright (pip install playwright)")
    if not shutil.which("chromium"):
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-kontext-trt").symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch"],
                            cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                info = json.load(urllib.request.urlopen(f"{url}/object_info", timeout=2))
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not answer within 120 s")
        yield url, info, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_server_lists_the_pack_nodes_and_templates(comfyui_server):
    url, info, _ = comfyui_server
    assert set(PACK_NODES) <= set(info), sorted(set(PACK_NODES) - set(info))
    templates = json.load(urllib.request.urlopen(f"{url}/workflow_templates", timeout=5))
    assert sorted(templates["comfyui-kontext-trt"]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_every_workflow_loads_in_chromium_with_no_missing_or_red_nodes(comfyui_server):
    from playwright.sync_api import sync_playwright

    url, _, _ = comfyui_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # A fresh user sees the template browser first; mark the tutorial done (ComfyUI's settings API) so the
    # screenshots show the loaded workflow rather than that dialog.
    request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2400, "height": 1300})
        page.goto(url)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                               " && window.LiteGraph.registered_node_types['KontextTRT_EditTurn']", timeout=120_000)
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
