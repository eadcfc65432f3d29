"""Every relative link in README.md and diary.md resolves to a file committed to the repository."""

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from lib.paths import PROJECT_ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images, and HTML img sources, that are relative paths."""
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^mailto:", t)]


def committed_files() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return set(out.stdout.splitlines())


def test_link_parser_finds_relative_targets():
    text = '[a](results/x.md) ![b](results/y.png "t") [c](https://x.org) [d](#top) <img src="results/z.gif">'
    assert relative_links(text) == ["results/x.md", "results/y.png", "results/z.gif"]


@pytest.mark.parametrize("doc", ["README.md", "diary.md"])
def test_relative_links_resolve_to_committed_files(doc):
    files = committed_files()
    folders = {str(Path(f).parent) for f in files} | {str(p) for f in files for p in Path(f).parents}
    broken = []
    for target in relative_links((PROJECT_ROOT / doc).read_text(encoding="utf-8")):
        path = str(Path(unquote(target.split("#")[0])))
        if path not in files and path.rstrip("/") not in folders:
            broken.append(target)
    assert not broken, f"{doc} links to files that are not committed: {broken}"
