"""What ComfyUI-Manager and the Comfy Registry read: pyproject, requirements, node_list.json."""
import json
import re
import warnings

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


def packed_files() -> list[str]:
    """The files `comfy node pack` puts in the node archive, by comfy-cli's own rules (comfy_cli/file_utils.py,
    zip_files): the git-tracked files (every file when git gives no list), less those .comfyignore's lines match
    as gitignore patterns (pathspec's "gitwildmatch", blank and '#' lines skipped), plus [tool.comfy] includes."""
    import os
    import subprocess

    pathspec = pytest.importorskip("pathspec", reason="pathspec (requirements-dev.txt) matches as comfy-cli does")
    try:
        tracked = subprocess.check_output(["git", "-C", str(ROOT), "ls-files"], text=True).splitlines()
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    if not tracked:  # comfy-cli's fallback outside a git checkout: the whole tree
        tracked = [str(p.relative_to(ROOT)).replace(os.sep, "/") for p in ROOT.rglob("*")
                   if p.is_file() and ".git" not in p.relative_to(ROOT).parts]
    lines = (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    with warnings.catch_warnings():  # pathspec 1.x calls the name comfy-cli uses deprecated; the rules are the same
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", [line.strip() for line in lines
                                                             if line.strip() and not line.lstrip().startswith("#")])
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    forced = [i.strip("/") for i in includes]
    return sorted(f for f in tracked if (ROOT / f).is_file() and (
        not spec.match_file(f) or any(f == i or f.startswith(i + "/") for i in forced)))


def test_node_archive_holds_the_pack_and_no_tests_benchmark_results_or_docs_images():
    packed = packed_files()
    left_out = [f for f in packed if f.startswith(("tests/", "benchmarks/results/", ".ci/"))
                or (f.startswith("docs/") and f.rsplit(".", 1)[-1].lower() in ("png", "jpg", "jpeg", "gif", "svg", "webp"))
                or f.endswith((".onnx", ".engine", ".plan", ".safetensors"))]
    assert not left_out, f".comfyignore lets these into the node archive: {left_out}"
    # Everything ComfyUI imports or serves, and what ComfyUI-Manager reads, is in it.
    needed = ["__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "node_list.json"]
    needed += [str(p.relative_to(ROOT)) for folder in ("nodes", "engines", "quant_configs", "workflows")
               for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    missing = sorted(set(needed) - set(packed))
    assert not missing, f"the node archive lacks {missing}"
    big = [f for f in packed if (ROOT / f).stat().st_size > 256 * 1024]
    assert not big, f"files over 256 KiB in the node archive: {big}"


def test_registry_metadata_names_the_platforms_and_an_icon():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    classifiers = meta["project"]["classifiers"]
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers
    assert "Operating System :: OS Independent" not in classifiers  # it needs an NVIDIA GPU and its libraries
    assert {"Operating System :: POSIX :: Linux", "Operating System :: Microsoft :: Windows"} <= set(classifiers)
    # The registry takes the icon as a URL; it must name a file of this repository, square, at most 400 x 400.
    icon = meta["tool"]["comfy"]["Icon"]
    repo = meta["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix), icon
    from PIL import Image

    with Image.open(ROOT / icon.removeprefix(prefix)) as image:
        assert image.width == image.height <= 400
