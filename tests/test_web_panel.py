"""The Kontext Edit panel outside the browser: its logic module under node's own test runner (tests/js/), and
the web folder as ComfyUI serves it (declared by the pack, every file an extension, nothing fetched from
elsewhere at run time). The panel in a real browser: tests/test_browser_chat_panel.py.
"""
import ast
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

WEB = ROOT / "web"


def test_panel_logic_passes_its_node_tests():
    node = shutil.which("node")
    if not node:
        pytest.skip("no node on PATH: the panel's logic tests (tests/js) need Node.js 18+")
    run = subprocess.run([node, "--test", str(ROOT / "tests" / "js")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.M)
    assert passed and int(passed.group(1)) >= 10, run.stdout[-2000:]


def test_pack_declares_its_web_directory():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    values = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert (ROOT / values["WEB_DIRECTORY"]).resolve() == WEB.resolve()
    exported = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    assert "WEB_DIRECTORY" in ast.literal_eval(exported)


def test_web_files_import_only_comfyui_and_each_other():
    # ComfyUI loads every .js under the web directory as an extension: no tests or build tools there, and
    # nothing fetched from another host when the panel loads.
    scripts = sorted(WEB.rglob("*.js"))
    assert {p.name for p in scripts} == {"kontext_chat.js", "kontext_thread.js"}
    for path in scripts:
        text = path.read_text()
        for spec in re.findall(r"""^\s*import\b[^'"]*['"]([^'"]+)['"]""", text, re.M):
            local = spec.startswith("./") and (path.parent / spec).is_file()
            assert local or spec in ("../../scripts/app.js", "../../scripts/api.js"), (path.name, spec)
        assert not re.search(r"https?://", text), f"{path.name} names a URL"
