"""The README and docs/ are a map: every relative link names a file of this repository and, with
`#anchor`, a heading of that file (GitHub's anchors), so a renamed section or file breaks this test."""

import functools
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [
    "README.md",
    *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def strip_fences(text: str) -> str:
    """`text` without fenced code blocks (a `# comment` in one is no heading, a link in one no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def strip_code(text: str) -> str:
    """`text` without fenced code blocks and inline code (links in code are not links)."""
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a markdown page: lowercased, punctuation but hyphens and
    underscores dropped, spaces as hyphens; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", strip_fences(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


@functools.cache
def anchors_of(file: str) -> frozenset[str]:
    """`anchors` of a page, read once however many links point into it."""
    with open(file) as f:
        return frozenset(anchors(f.read()))


def test_anchors_follow_githubs_rules():
    text = (
        "# Fixed labels (`signal=precomputed`)\n## 120 epochs, on a retrained surrogate\n## Notes\n## Notes\n"
    )
    assert anchors(text) == {
        "fixed-labels-signalprecomputed",
        "120-epochs-on-a-retrained-surrogate",
        "notes",
        "notes-1",
    }
    assert LINK.findall(strip_code("see [a](docs/a.md#b) and `[c](d.md)`")) == ["docs/a.md#b"]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_names_a_file_and_a_heading_that_exist(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    broken = []
    for target in LINK.findall(strip_code(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (
            os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
            if path
            else os.path.join(ROOT, page)
        )
        if not os.path.exists(file):
            broken.append(f"{target}: no file {os.path.relpath(file, ROOT)}")
        elif anchor and file.endswith(".md") and anchor not in anchors_of(file):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{page}: " + "; ".join(broken)
