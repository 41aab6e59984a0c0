"""The README is a front page whose links resolve and whose figures have files behind them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
RESULT_PATH = re.compile(r"benchmarks/results/[\w./-]+")


def _local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    missing = [t for t in _local_links(page) if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{page.name}: links to nothing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_results_file_is_committed(page):
    cited = {m.rstrip(".") for m in RESULT_PATH.findall(page.read_text())}
    missing = [c for c in cited if not (ROOT / c).exists()]
    assert not missing, f"{page.name}: cites results that are not in the repository: {missing}"


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert {"docs/embedded-world.md", "docs/methods.md", "docs/sweeper.md", "docs/speed.md"} <= set(
        _local_links(ROOT / "README.md"))


def test_the_readme_results_table_is_the_committed_one():
    """Each row of the README's results table appears, with the same figures, in the table.md it cites."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Results")
    section = readme[start:readme.find("\n## ", start + 1)]
    source = ROOT / RESULT_PATH.search(section).group(0).rstrip(".")
    rows = [line for line in section.splitlines() if re.match(r"\| [A-Za-z]", line) and "method" not in line]
    assert rows, "no results table in the README"
    committed = source.read_text()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        match = [line for line in committed.splitlines() if line.startswith(f"| {cells[0]} |")]
        assert match, f"{cells[0]!r} is not in {source}"
        assert all(c in match[0] for c in cells[1:3]), f"{cells[0]!r}: README {cells[1:3]} vs {match[0]}"
