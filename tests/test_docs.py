"""The user guide (docs/) and the README's links into it: every link reaches a file and a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))
# The README's links are absolute, so that they work on the package index's page too.
GITHUB = re.compile(r"https://(?:github\.com/ru-llm/batchrunner/(?:blob|tree)/main|"
                    r"raw\.githubusercontent\.com/ru-llm/batchrunner/main)/(?P<path>[^)#\s]*)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a fence of four backticks may hold one of three)."""
    return re.sub(r"^(`{3,})[^\n]*\n.*?^\1\s*$", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page."""
    headings = re.findall(r"^#+ (.+)$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[tuple[Path, str | None, str]]:
    found = []
    for link in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        target, _, anchor = link.partition("#")
        if link.startswith("http"):
            match = GITHUB.match(link)
            if match is None:
                continue
            path = REPO / match["path"]
        else:
            path = (page.parent / target) if target else page
        found.append((path, anchor or None, link))
    return found


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_link_reaches_a_file_and_a_heading(page: Path) -> None:
    for path, anchor, link in _links(page):
        assert path.exists(), f"{page.relative_to(REPO)}: {link} points at no file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.relative_to(REPO)}: {link}: no such heading"


def test_the_readme_links_every_page_of_the_guide() -> None:
    linked = {path.resolve() for path, _, _ in _links(REPO / "README.md")}
    index = {path.resolve() for path, _, _ in _links(REPO / "docs" / "README.md")}
    assert (REPO / "docs" / "README.md").resolve() in linked
    assert {page.resolve() for page in PAGES} - {(REPO / "docs" / "README.md").resolve()} <= index


def test_the_guide_cites_no_document_the_repository_lacks() -> None:
    """A reader of the repository has the README and docs/, nothing else: the code, the guide,
    the job files, the benchmarks, the samples and the tests say the thing, or point at docs/."""
    files = [REPO / "README.md", REPO / "ARCHITECTURE.md", *PAGES, *REPO.glob("docs/*.py"),
             *REPO.glob("jobs/*"), *REPO.glob("bench/*.md"), *REPO.glob("bench/*.py"),
             *REPO.glob("sample_data/*.py"), *REPO.glob("tests/*.py"),
             *REPO.glob("batchrunner/**/*.py")]
    for file in files:
        if file.resolve() == Path(__file__).resolve():
            continue
        assert not re.search(r"\bSPEC\b", file.read_text()), file.relative_to(REPO)
