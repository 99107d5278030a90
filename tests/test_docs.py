"""The README and docs/: every relative link points to a file that exists, and the README is read
in one sitting (at most 200 lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that are paths (not web addresses or anchors)."""
    return [target for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(page):
    missing = [target for target in relative_links(page)
               if not (page.parent / target.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing {missing}"


def test_the_link_check_sees_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [here](docs/nowhere.md), [a site](https://example.org) and [up](#top).")
    assert relative_links(page) == ["docs/nowhere.md"]
    assert not (page.parent / "docs/nowhere.md").exists()


def test_the_readme_is_at_most_200_lines_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = relative_links(ROOT / "README.md")
    linked = {Path(target.split("#")[0]).as_posix() for target in links}
    pages = {page.relative_to(ROOT).as_posix() for page in PAGES[1:]}
    assert pages and pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"
