"""The front page and docs/: every relative link lands on a file (and a heading, for #anchors),
every docs page is reachable from the README, and the README's commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def _links(page: pathlib.Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here
            yield target


def test_every_relative_link_lands_on_a_file_and_heading():
    broken = []
    for page in _pages():
        for target in _links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_link_checker_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](b.md#the-part) [gone](c.md) [bad](b.md#nowhere)\n")
    (tmp_path / "b.md").write_text("# B\n\n## The part\n")
    found = [t for t in _links(tmp_path / "a.md")]
    assert found == ["b.md#the-part", "c.md", "b.md#nowhere"]
    assert "the-part" in _anchors(tmp_path / "b.md") and "nowhere" not in _anchors(tmp_path / "b.md")


def test_every_docs_page_is_linked_from_the_front_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    orphans = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert orphans == []


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "KERAS_BACKEND=torch python -m pytest tests -q" in readme
    assert "KERAS_BACKEND=torch python -m pytest tests -q" in ci
    for step in ("torch==2.13.0", "--no-deps keras-hub==0.32.0", '".[test,bench,hub]"'):
        assert step in readme and step in ci, step


def test_the_front_page_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
