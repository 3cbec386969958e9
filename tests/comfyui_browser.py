"""A real ComfyUI server on 127.0.0.1 and headless Chromium for the browser tests, or the reason they skip.

The server is the checkout's main.py run by this Python with its environment (so its packages: ComfyUI's
requirements with its frontend and templates; one Python can serve another checkout when that checkout's
pinned packages come first on PYTHONPATH), on the CPU, with a fresh base directory whose custom_nodes link
this pack (and any test-only packs).
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from comfyui_checkout import find_comfyui

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def require_browser_stack() -> Path:
    """The ComfyUI checkout, when it, its frontend, Playwright and Chromium are all here; skips otherwise."""
    comfy, why = find_comfyui()
    if comfy is None:
        pytest.skip(why)
    pytest.importorskip("comfyui_frontend_package", reason="ComfyUI's frontend (pip install comfyui-frontend-package)")
    pytest.importorskip("playwright.sync_api", reason="Playwright (pip install playwright)")
    if not shutil.which("chromium"):
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return comfy


def pinned_frontend(comfy: Path) -> str | None:
    """The comfyui-frontend-package version the checkout's requirements.txt pins."""
    found = re.search(r"^comfyui-frontend-package==(\S+)", (comfy / "requirements.txt").read_text(), re.M)
    return found.group(1) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def comfyui_server(comfy: Path, base: Path, packs: dict[str, Path]):
    """Yields (url, object_info, log path) of a ComfyUI server whose custom_nodes are `packs` (folder name -> path)."""
    (base / "custom_nodes").mkdir(parents=True)
    for name, path in packs.items():
        (base / "custom_nodes" / name).symlink_to(path, target_is_directory=True)
    port = _free_port()
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch"]
    log_path = base / "comfyui.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(240):
                if proc.poll() is not None:
                    pytest.fail(f"ComfyUI exited: {log_path.read_text()[-3000:]}")
                try:
                    info = json.load(urllib.request.urlopen(f"{url}/object_info", timeout=2))
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                pytest.fail("ComfyUI did not answer within 120 s")
            # A fresh user sees the template browser first; mark the tutorial done (ComfyUI's settings API).
            request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST",
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5)
            yield url, info, log_path
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)


def open_comfyui(browser, url: str, viewport=(1400, 900)):
    """A page with ComfyUI's app loaded and the pack's nodes registered in the frontend."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(url)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && window.LiteGraph.registered_node_types['KontextTRT_EditTurn']", timeout=120_000)
    return page
