"""The Kontext Edit chat panel in a real browser: ComfyUI on 127.0.0.1 (its pinned frontend) with the pack and
test-only loaders of the tiny random-weight Kontext and stand-in FLUX text encoders / VAE
(tests/comfyui_standins), on the CPU; headless Chromium driven by Playwright does what a person does in the
panel, and ComfyUI's graph, websocket events and /history say what happened.

Screenshots land in output/browser/ (the test's artifacts). Skips with the reason when ComfyUI, its
frontend, Playwright or Chromium is missing, or when the server's frontend is not the one the checkout pins.
"""
import base64
import json
import re
import urllib.request
from pathlib import Path

import pytest

from comfyui_browser import comfyui_server, launch_chromium, open_comfyui, pinned_frontend, require_browser_stack

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "output" / "browser"
pytestmark = pytest.mark.comfyui

TURNS = """() => {
  const g = window.app.graph;
  const from = (n, name) => { const s = n.findInputSlot(name); const l = s < 0 ? null : n.getInputLink(s); return l ? l.origin_id : null; };
  const value = (n, name) => n.widgets.find((w) => w.name === name)?.value;
  return (g.nodes ?? g._nodes).filter((n) => n.type === 'KontextTRT_EditTurn').sort((a, b) => a.id - b.id).map((n) => ({
    id: n.id, previous: from(n, 'previous'), image: from(n, 'image'), model: from(n, 'model'), clip: from(n, 'clip'),
    vae: from(n, 'vae'), instruction: value(n, 'instruction'), seed: value(n, 'seed'), steps: value(n, 'steps'),
    resize: value(n, 'resize'), control: value(n, 'control_after_generate') }));
}"""
NODE_TYPES = "() => (window.app.graph.nodes ?? window.app.graph._nodes).map((n) => n.type).sort()"
# Graph edits made here through LiteGraph reach the panel as a person's edits do: through ComfyUI's change tracker.
CHECK_STATE = "() => window.app.extensionManager.workflow.activeWorkflow.changeTracker.checkState()"
# The thread shows exactly these turns, each with its result image loaded, none running.
THREAD_DONE = """(ids) => {
  const cards = [...document.querySelectorAll('.kx-turn')];
  return cards.map((c) => Number(c.dataset.turn)).join() === ids.join() && cards.every((c) => {
    const img = c.querySelector('img.kx-result');
    return img && img.complete && img.naturalWidth > 0 && !c.querySelector('.kx-status'); });
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = require_browser_stack()
    packs = {"comfyui-kontext-trt": ROOT, "kontext_test_standins": ROOT / "tests" / "comfyui_standins"}
    with comfyui_server(comfy, tmp_path_factory.mktemp("comfy_base"), packs) as (url, info, log):
        yield url, info, log, pinned_frontend(comfy)


def _image(path: Path, size) -> Path:
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("RGB", size, (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, h * 2 // 3, w, h], fill=(70, 130, 60))
    draw.ellipse([w * 0.65, h * 0.1, w * 0.85, h * 0.1 + w * 0.2], fill=(250, 210, 80))
    draw.rectangle([w * 0.15, h * 0.4, w * 0.4, h * 0.75], fill=(180, 90, 60))
    image.save(path)
    return path


def _history(url):
    return json.load(urllib.request.urlopen(f"{url}/history", timeout=10))


def _open_panel(page):
    if not page.locator(".kx-panel").count():
        page.locator(".kontext-edit-tab-button").first.click()
    page.locator(".kx-panel").wait_for()


def _send(page, text):
    box = page.locator(".kx-input")
    box.fill(text)
    box.press("Enter")


def _cards(page):
    return page.eval_on_selector_all(".kx-turn", """cards => cards.map((c) => ({
        id: Number(c.dataset.turn), text: c.querySelector('.kx-instruction').textContent,
        active: c.classList.contains('kx-active'), error: c.querySelector('.kx-error')?.textContent ?? null,
        meta: [...c.querySelectorAll('.kx-meta')].map((m) => m.textContent).join(' | ') }))""")


def _frame_for_screenshot(page):
    """Screenshot cosmetics: every node in the part of the canvas the sidebar leaves free."""
    page.evaluate("""() => {
      const c = window.app.canvas, nodes = window.app.graph.nodes ?? window.app.graph._nodes;
      const left = document.querySelector('.kx-panel').getBoundingClientRect().right + 30, top = 110;
      const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 30));
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
      const r = c.canvas.getBoundingClientRect();
      // All of it, unless that is below the zoom where the frontend stops drawing node text.
      const scale = Math.max(0.65, Math.min(1, (r.right - left - 20) / (x1 - x0), (r.bottom - top - 20) / (y1 - y0)));
      c.ds.scale = scale;
      c.ds.offset = [(left - r.left) / scale - x0, (top - r.top) / scale - y0];
      c.setDirty(true, true);
    }""")
    page.wait_for_timeout(500)


def test_a_conversation_in_the_panel_is_the_graph(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, info, log, pinned = server
    assert {"TinyKontextModel", "TinyFluxClip", "TinyFluxVae", "KontextTRT_EditTurn"} <= set(info)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    source = _image(tmp_path / "street.png", (96, 64))
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_comfyui(browser, url, viewport=(1400, 1000))
        problems = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        try:
            served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
            if pinned and served != pinned:
                pytest.skip(f"the server runs frontend {served}, the checkout pins {pinned}: put that "
                            "comfyui-frontend-package first on PYTHONPATH")
            tag = f"comfyui_frontend_{served}"
            # ComfyUI's own websocket events, counted here: which nodes actually executed.
            page.evaluate("""async () => { const { api } = await import('/scripts/api.js'); window.__kxRuns = [];
                             window.__kxSteps = new Set();
                             api.addEventListener('executing', (e) => window.__kxRuns.push(e.detail));
                             new MutationObserver(() => document.querySelectorAll('.kx-status').forEach(
                               (s) => window.__kxSteps.add(s.textContent))).observe(document.body, { subtree: true,
                               childList: true, characterData: true }); }""")
            page.evaluate("() => window.app.graph.clear()")
            # A wider sidebar for the screenshots: the frontend's splitter keeps a tab's width (in %) under its id.
            page.evaluate("() => ['kontext-edit', 'unified-sidebar'].forEach((k) => localStorage.setItem(k, '[30,70]'))")
            _open_panel(page)

            # An empty graph: "Add loaders" makes ComfyUI's usual FLUX loaders, and the panel offers them.
            page.click(".kx-loaders")
            assert page.evaluate(NODE_TYPES) == ["DualCLIPLoader", "UNETLoader", "VAELoader"]
            assert "Load Diffusion Model" in page.locator(".kx-source-model").inner_text()
            # This machine has no FLUX weights: the test's tiny loaders instead (any MODEL the Edit Turn takes).
            loaders = page.evaluate("""() => { const g = window.app.graph; g.clear();
              return ['TinyKontextModel', 'TinyFluxClip', 'TinyFluxVae'].map((type, i) => {
                const n = window.LiteGraph.createNode(type); g.add(n); n.pos = [40, 40 + 110 * i]; return n.id; }); }""")
            page.evaluate(CHECK_STATE)
            for kind, loader in zip(("model", "clip", "vae"), loaders):
                assert page.locator(f".kx-source-{kind}").input_value() == f"{loader}:0"

            # An instruction before any image is refused in the panel, and so is an empty one.
            _send(page, "make it dusk")
            assert "image to edit first" in page.locator(".kx-notice").inner_text()
            page.locator(".kx-panel input[type=file]").set_input_files(str(source))
            page.wait_for_function("() => { const i = document.querySelector('.kx-source img'); return i && i.complete && i.naturalWidth === 96; }")
            _send(page, "   ")
            assert "empty one is not sent" in page.locator(".kx-notice").inner_text()
            assert page.evaluate(TURNS) == []

            # Few steps at the image's own size: the tiny model on a CPU.
            page.locator(".kx-steps").fill("2")
            page.locator(".kx-steps").dispatch_event("change")
            page.locator(".kx-resize").select_option("keep")
            instructions = ["remove the people", "make it dusk", "add light rain"]
            for n, text in enumerate(instructions, 1):
                _send(page, text)
                ids = [t["id"] for t in page.evaluate(TURNS)]
                assert len(ids) == n and page.locator(".kx-input").input_value() == ""  # taken: the box is empty
                page.wait_for_function(THREAD_DONE, arg=ids, timeout=60_000)
            _frame_for_screenshot(page)
            page.screenshot(path=str(ARTIFACTS / f"chat_panel_{tag}.png"))

            turns = page.evaluate(TURNS)
            assert [t["instruction"] for t in turns] == instructions
            image_node = turns[0]["image"]
            assert page.evaluate("(id) => window.app.graph.getNodeById(id).type", image_node) == "LoadImage"
            assert [t["previous"] for t in turns] == [None, turns[0]["id"], turns[1]["id"]]  # chained
            assert all((t["model"], t["clip"], t["vae"]) == tuple(loaders) for t in turns)
            assert all(t["steps"] == 2 and t["resize"] == "keep" and t["control"] == "fixed" for t in turns)
            assert len({t["seed"] for t in turns}) == 3
            cards = _cards(page)
            assert [c["text"] for c in cards] == [f"{i}. {t}" for i, t in enumerate(instructions, 1)]
            assert [c["active"] for c in cards] == [False, False, True]
            for card, turn in zip(cards, turns):  # each turn's seed and time
                assert re.search(rf"seed {turn['seed']} · \d+\.\d s", card["meta"]), card
            assert any(re.fullmatch(r"step [12]/2", s) for s in page.evaluate("() => [...window.__kxSteps]")), \
                "no live sampling progress was shown"
            first, last = turns[0]["id"], turns[-1]["id"]

            # Branch: turn 1 becomes active; the next instruction continues from it and turn 1 does not sample again.
            page.locator(f'.kx-turn[data-turn="{first}"]').click()
            assert [c["active"] for c in _cards(page)] == [True, False, False]
            _send(page, "make it snowy")
            turns = page.evaluate(TURNS)
            branch = turns[-1]
            page.wait_for_function(THREAD_DONE, arg=[first, branch["id"]], timeout=60_000)
            assert branch["previous"] == first and len(turns) == 4
            cards = _cards(page)
            assert [c["id"] for c in cards] == [first, branch["id"]]
            assert "‹ 2/2 ›" in cards[1]["meta"]
            runs = page.evaluate("() => window.__kxRuns")
            assert runs.count(str(first)) == 1 and runs.count(str(branch["id"])) == 1, runs
            entry = next(e for e in _history(url).values() if e["prompt"][4] == [str(branch["id"])])
            cached = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
            assert cached and str(first) in cached[0] and str(branch["id"]) not in cached[0], entry["status"]
            page.screenshot(path=str(ARTIFACTS / f"chat_panel_branch_{tag}.png"))

            # Again: the same instruction from the same parent with a new seed, a third branch.
            page.click(".kx-again")
            again = page.evaluate(TURNS)[-1]
            page.wait_for_function(THREAD_DONE, arg=[first, again["id"]], timeout=60_000)
            assert (again["previous"], again["instruction"]) == (first, "make it snowy") and again["seed"] != branch["seed"]
            assert "‹ 3/3 ›" in _cards(page)[1]["meta"]
            # Save: the active turn's image, as ComfyUI serves it.
            with page.expect_download() as download:
                page.click(".kx-save")
            assert download.value.suggested_filename == f"kontext_turn2_seed{again['seed']}.png"
            assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # Undo twice: the newest turn of the active branch each time, back to the three-turn chain.
            page.click(".kx-undo")
            assert [t["id"] for t in page.evaluate(TURNS)] == [t["id"] for t in turns]
            assert [c["id"] for c in _cards(page)] == [first, branch["id"]]
            page.click(".kx-undo")
            assert [t["instruction"] for t in page.evaluate(TURNS)] == instructions
            assert [(c["id"], c["active"]) for c in _cards(page)] == [(first, True), (turns[1]["id"], False), (last, False)]

            # Reload: ComfyUI restores the workflow, and the panel reads the same thread back from it.
            page.reload()
            page.wait_for_function("() => window.app && window.app.graph && (window.app.graph.nodes ?? window.app.graph._nodes).length")
            _open_panel(page)
            page.wait_for_function(THREAD_DONE, arg=[t["id"] for t in turns[:3]], timeout=30_000)
            cards = _cards(page)
            assert [c["text"] for c in cards] == [f"{i}. {t}" for i, t in enumerate(instructions, 1)]
            assert [c["active"] for c in cards] == [True, False, False]

            # Stop: ComfyUI's interrupt ends a running turn, and the thread says so.
            page.locator(".kx-steps").fill("100")
            page.locator(".kx-steps").dispatch_event("change")
            _send(page, "a slow edit")
            page.wait_for_function("() => /^step \\d+\\/100$/.test(document.querySelector('.kx-status')?.textContent ?? '')",
                                   timeout=60_000)
            page.click(".kx-stop")
            page.wait_for_function("() => document.querySelector('.kx-active .kx-error')?.textContent === 'stopped'",
                                   timeout=60_000)
            page.click(".kx-undo")
            assert [t["instruction"] for t in page.evaluate(TURNS)] == instructions
            page.locator(".kx-steps").fill("2")
            page.locator(".kx-steps").dispatch_event("change")

            # A turn that fails shows ComfyUI's error in the thread: an 8x8 image (dropped on the panel) is below
            # one latent patch.
            png = base64.b64encode(_image(tmp_path / "tiny.png", (8, 8)).read_bytes()).decode()
            dropped = page.evaluate_handle("""(b64) => { const dt = new DataTransfer();
              dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], 'tiny.png', { type: 'image/png' }));
              return dt; }""", png)
            page.dispatch_event(".kx-thread", "drop", {"dataTransfer": dropped})
            page.wait_for_function("() => document.querySelector('.kx-source img')?.naturalWidth === 8")
            assert len(page.evaluate(TURNS)) == 3 and not _cards(page)  # a new conversation: the image, no turns
            # It keeps the settings the panel showed.
            assert (page.locator(".kx-steps").input_value(), page.locator(".kx-resize").input_value()) == ("2", "keep")
            _send(page, "make it dusk")
            page.wait_for_function("() => document.querySelector('.kx-turn .kx-error')", timeout=60_000)
            failed = _cards(page)
            assert len(failed) == 1 and "image: expected at least 16x16 pixels, got 8x8" in failed[0]["error"], failed
            assert "‹ 2/2 ›" in failed[0]["meta"]  # beside the first conversation, which is still in the graph

            # A workflow the panel did not make reads as a thread too: the shipped three-turn edit.
            shipped = json.loads((ROOT / "workflows" / "kontext_three_turn_edit_quantized.json").read_text())
            page.evaluate("(wf) => window.app.loadGraphData(wf)", shipped)
            page.wait_for_function("() => document.querySelectorAll('.kx-turn').length === 3")
            cards = _cards(page)
            expected = [n["widgets_values"][0] for n in sorted(shipped["nodes"], key=lambda n: n["id"])
                        if n["type"] == "KontextTRT_EditTurn"]
            assert [c["text"] for c in cards] == [f"{i}. {t}" for i, t in enumerate(expected, 1)]
            assert [c["active"] for c in cards] == [False, False, True]
            assert page.locator(".kx-source-model option:checked").inner_text().startswith("Kontext TRT: Load Quantized Model")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "chat_panel_failure.png"))
            print("\n".join(problems[-30:]), "\n--- ComfyUI log ---\n", log.read_text()[-4000:])
            raise
        browser.close()

