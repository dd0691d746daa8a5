"""The README and docs/ link only to what a clone of the repository has: files in it, and
headings that exist (a link to ../shared/ or a renamed section is a dead end for readers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = _FENCE.sub("", page.read_text())
    headings = re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text()))


def test_links_stay_inside_the_repository_and_reach_something() -> None:
    dead = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto: — outside by intent
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if ROOT not in where.parents and where != ROOT:
                dead.append(f"{page.name}: {target} leaves the repository")
            elif not where.exists():
                dead.append(f"{page.name}: {target} does not exist")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                dead.append(f"{page.name}: {target} names no heading of {where.name}")
    assert not dead, "\n".join(dead)


def test_the_readme_points_at_the_design_in_docs() -> None:
    assert "docs/design.md" in _links(ROOT / "README.md")
    assert "../shared" not in (ROOT / "README.md").read_text()
