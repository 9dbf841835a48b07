"""The user documentation stays navigable and its sources stay where it says they are.

- every relative Markdown link in README.md, CONTRIBUTING.md, docs/ and the results READMEs
  points at a file that exists, and a `#fragment` at a heading of that file;
- every results log a document cites (`<date>_<commit>/<file>`) exists in benchmarks/results/;
- docs/README.md lists every document in docs/;
- no document narrates periods of work ("session 3", "run 4", "this sitting"): docs speak of
  commits, devices and dates.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULT_READMES = sorted(RESULTS.glob("**/README.md"))
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS, *RESULT_READMES]

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
RESULTS_LOG = re.compile(r"(20\d\d-\d\d-\d\d_[0-9a-f]{7})/([\w.*-]+\.(?:log|csv|txt|json|png|md))")
NARRATION = re.compile(
    r"\b(?:sessions?\b(?!Storage)(?! fixture)|runs? [0-9]+\b|this sitting|first we\b|we tried|series of device runs)",
    re.I)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def _prose(path: Path) -> str:
    return CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_rel)
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in LINK.findall(_prose(doc)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    assert not broken, f"{_rel(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_rel)
def test_cited_result_logs_exist(doc: Path):
    missing = [f"{folder}/{name}" for folder, name in RESULTS_LOG.findall(doc.read_text(encoding="utf-8"))
               if not list((RESULTS / folder).glob(name))]
    assert not missing, f"{_rel(doc)} cites results that benchmarks/results/ does not hold: {missing}"


def test_docs_index_lists_every_document():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    unlisted = [d.name for d in DOCS if d.name != "README.md" and f"]({d.name})" not in index]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_rel)
def test_no_narrated_periods_of_work(doc: Path):
    hits = [m.group(0) for m in NARRATION.finditer(_prose(doc))]
    assert not hits, f"{_rel(doc)} narrates periods of work ({hits}); name the commit, device and date instead"


def test_slug_matches_githubs_rule():
    assert _slug("FP8 KV cache (`kv_cache_dtype=\"fp8\"`)") == "fp8-kv-cache-kv_cache_dtypefp8"
    assert _slug("Skinny GEMM and its dispatch") == "skinny-gemm-and-its-dispatch"
