"""What ComfyUI-Manager and the Comfy Registry read: pyproject, requirements, node_list.json."""
import json
import re

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the pack itself runs on 3.10


def declared_node_ids():
    return {m for p in (ROOT / "nodes").glob("*.py") for m in re.findall(r'node_id="([^"]+)"', p.read_text())}


def test_node_list_names_every_node():
    # ComfyUI-Manager's scanner does not see V3 schema nodes; node_list.json tells it.
    listed = set(json.loads((ROOT / "node_list.json").read_text()))
    assert listed == declared_node_ids() and listed


def test_pyproject_has_what_the_registry_needs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert project["urls"] and project["requires-python"]


def requirement_names(lines):
    return {re.split(r"[<>=~!\[; ]", line.strip())[0].lower() for line in lines
            if line.strip() and not line.startswith(("#", "-"))}


def test_requirements_never_name_torch_and_agree_with_pyproject():
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    names = requirement_names(reqs)
    assert not names & {"torch", "torchvision", "torchaudio"}, "torch belongs to ComfyUI"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert names == requirement_names(pyproject)
