"""The README is a user guide that fits on a few screens, and every link in it and in docs/ resolves.

Links are checked the way GitHub renders them: a relative path must name a file or folder of this tree, and a
`#fragment` must be the slug of a heading in the file it points to (GitHub's rule: lower case, punctuation
other than `-` and `_` dropped, spaces to hyphens).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 15_000
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return pages + [p for p in (ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md") if p.is_file()]


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `[x](y)` in a code sample is not a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    slugs: set[str] = set()
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            base = _slug(m.group(2))
            slug, n = base, 1
            while slug in slugs:  # GitHub numbers repeated headings
                slug, n = f"{base}-{n}", n + 1
            slugs.add(slug)
    return slugs


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def test_the_readme_is_a_guide_that_fits_in_15_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move reference material into docs/"
    text = (ROOT / "README.md").read_text()
    for command in ("make demo", "make test"):
        assert command in text, f"the README must give the set-up command {command!r}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked offline
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.is_file() and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages no README link reaches: {orphans}"


def test_the_link_checker_catches_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title\n\n## The demo, measured (`make demo`)\n\n[ok](#the-demo-measured-make-demo)\n"
    )
    assert "the-demo-measured-make-demo" in _anchors(tmp_path / "a.md")
    (tmp_path / "b.md").write_text("[x](a.md#nope) [y](missing.md)\n```\n[z](in-code.md)\n```\n")
    assert _links(tmp_path / "b.md") == ["a.md#nope", "missing.md"]
    assert "nope" not in _anchors(tmp_path / "a.md")
