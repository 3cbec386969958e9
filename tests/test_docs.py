"""The user-facing pages: the README stays a page a newcomer reads, and every result file the docs quote exists."""
import re

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"
# A result file as the pages name it: <subject>/<file> under benchmarks/results/ (optionally with that prefix).
RESULT_PATH = re.compile(r"(?<![\w/])(?:benchmarks/)?(?:results/)?((?:accuracy|build|speed|energy|kernels)/[\w.*-]+?"
                         r"\.(?:jsonl|json|txt|csv|log))(?![\w.])")


def test_readme_fits_a_newcomers_reading():
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 12_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_user_facing_text_names_no_process(page):
    text = page.read_text(encoding="utf-8")
    found = re.findall(r"\bissues? #?\d+|\blent\b", text, flags=re.IGNORECASE)
    assert not found, f"{page.name}: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_result_file_a_page_names_exists(page):
    names = RESULT_PATH.findall(page.read_text(encoding="utf-8"))
    missing = [n for n in names if not (list(RESULTS.glob(n)) if "*" in n else (RESULTS / n).is_file())]
    assert not missing, f"{page.name} names result files that benchmarks/results/ lacks: {missing}"


def test_the_pages_name_their_result_files_by_subject():
    # A measurement quoted with a bare file name, no subject folder, cannot be found after the results moved.
    bare = re.compile(r"(?<![\w/.])[a-z0-9_]+_h[12]00[\w-]*\.(?:jsonl|json|txt|csv|log)")
    found = {p.name: bare.findall(p.read_text(encoding="utf-8")) for p in PAGES}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
