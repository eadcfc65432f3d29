"""Every relative link in README.md, diary.md, docs/*.md and the results pages (results/**/*.md)
resolves to a file of the repository, and a link with a #fragment to a heading of the Markdown file
it names; README.md stays a short guide with its sections in order."""

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from lib.common.paths import PROJECT_ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")
DOCS = ["README.md", "diary.md"] + sorted(p.relative_to(PROJECT_ROOT).as_posix()
                                          for p in (PROJECT_ROOT / "docs").glob("*.md"))
RESULTS_DOCS = sorted(p.relative_to(PROJECT_ROOT).as_posix()
                      for p in (PROJECT_ROOT / "results").rglob("*.md"))
README_MAX_BYTES = 12_000
README_SECTIONS = [  # level-2 headings of README.md, in this order (others may sit between them)
    "The notebooks",
    "Results at a glance",
    "The two commands",
    "Running on your own data",
    "How the settings are chosen",
    "Predicting new scans",
    "Google Colab",
    "The synthetic-data study",
    "Where things are",
]


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images, and HTML img sources, that are relative paths."""
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^mailto:", t)]


def fragment_links(text: str) -> list[str]:
    """Targets of Markdown links that carry a #fragment (``#x`` or ``file.md#x``), not URLs."""
    targets = [a for a, _ in LINK.findall(text)]
    return [t for t in targets if "#" in t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lower case, punctuation other than '-'
    and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks); repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchor = github_anchor(m.group(1))
            found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
            seen[anchor] = seen.get(anchor, 0) + 1
    return found


def repository_files() -> set[str]:
    """Committed files, and new files that are not git-ignored (so they will be committed with the
    docs that link to them); ignored outputs such as runs/ and data/ do not count."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return set(out.stdout.splitlines())


def resolve(doc: str, target: str) -> str:
    """A link target as a path from the repository root (links are relative to their document)."""
    return os.path.normpath(Path(doc).parent / unquote(target.split("#")[0])).replace(os.sep, "/")


def test_link_parser_finds_relative_targets():
    text = '[a](results/x.md) ![b](results/y.png "t") [c](https://x.org) [d](#top) <img src="results/z.gif">'
    assert relative_links(text) == ["results/x.md", "results/y.png", "results/z.gif"]


def test_links_resolve_relative_to_their_document():
    assert resolve("docs/results.md", "../results/x/README.md#a") == "results/x/README.md"
    assert resolve("README.md", "docs/study.md#on-a-cluster") == "docs/study.md"
    assert resolve("docs/data.md", "../results/") == "results"


def test_docs_pages_are_checked():
    assert "docs/results.md" in DOCS and "docs/study.md" in DOCS


def test_github_anchors():
    text = "# Diary\n## 2026-11-22 — Data of `Task02_Heart_dev` (CPU, 2.5D)\n## A\n## A\n## A\n"
    assert anchors(text + "```\n# x\n```\n") == {
        "diary", "2026-11-22--data-of-task02_heart_dev-cpu-25d", "a", "a-1", "a-2"}
    links = "[a](#x) [b](docs/y.md#z) [c](https://x.org/#q) [d](e.md)"
    assert fragment_links(links) == ["#x", "docs/y.md#z"]


def test_results_pages_are_checked():
    assert "results/Task02_Heart_dev/README.md" in RESULTS_DOCS


@pytest.mark.parametrize("doc", DOCS + RESULTS_DOCS)
def test_relative_links_resolve_to_repository_files(doc):
    files = repository_files()
    folders = {str(p) for f in files for p in Path(f).parents}
    broken = []
    for target in relative_links((PROJECT_ROOT / doc).read_text(encoding="utf-8")):
        path = resolve(doc, target)
        if path not in files and path.rstrip("/") not in folders:
            broken.append(target)
    assert not broken, f"{doc} links to files that are not in the repository: {broken}"


@pytest.mark.parametrize("doc", DOCS + RESULTS_DOCS)
def test_links_to_headings_resolve(doc):
    broken = []
    for target in fragment_links((PROJECT_ROOT / doc).read_text(encoding="utf-8")):
        path = resolve(doc, target) if not target.startswith("#") else doc
        fragment = unquote(target.split("#", 1)[1])
        if path.endswith(".md") and (PROJECT_ROOT / path).is_file() and fragment not in anchors(
                (PROJECT_ROOT / path).read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{doc} links to headings that do not exist: {broken}"


def test_readme_is_a_short_guide_with_its_sections_in_order():
    readme = (PROJECT_ROOT / "README.md").read_bytes()
    assert len(readme) < README_MAX_BYTES, f"README.md is {len(readme)} bytes; move detail to docs/"
    headings = re.findall(r"^## (.+?)\s*$", readme.decode("utf-8"), flags=re.M)
    missing = [s for s in README_SECTIONS if s not in headings]
    assert not missing, f"README.md lacks the sections {missing}"
    order = [headings.index(s) for s in README_SECTIONS]
    assert order == sorted(order), f"README.md sections out of order: {headings}"
    assert "### On a cluster" in readme.decode("utf-8")


@pytest.mark.parametrize("dataset", sorted(p.name for p in (PROJECT_ROOT / "results").iterdir() if p.is_dir()))
def test_each_published_dataset_stays_under_25_mb(dataset):
    files = [p for p in (PROJECT_ROOT / "results" / dataset).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 25 * 2**20, f"results/{dataset}: {total / 2**20:.1f} MB; publish fewer notebooks or smaller figures"
