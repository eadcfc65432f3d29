"""Write the repository's address from ``pyproject.toml`` ([project.urls] Repository) into the
notebooks' Colab setup cells (their ``REPO_URL`` form field) and the README's "Open in Colab"
badges. After a fork or a move, change that one line of pyproject.toml and run::

    python tools/set_repository.py            # rewrite notebooks and README
    python tools/set_repository.py --check    # exit 1 when they disagree with pyproject.toml
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.common.atomic import write_text  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
URL_LINE = re.compile(r'REPO_URL = \\"[^"\\]*\\"')  # as stored in the notebook's JSON
BADGES = re.compile(r"<!-- colab badges -->.*?<!-- /colab badges -->", re.S)


def repository() -> str:
    """The address in pyproject.toml, without a trailing ``.git``."""
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    return urls["Repository"].removesuffix(".git").rstrip("/")


def colab_link(repo: str, notebook: str) -> str:
    """Colab's address of a notebook of the repository's main branch on GitHub."""
    return f"https://colab.research.google.com/github/{repo.removeprefix('https://github.com/')}/blob/main/{notebook}"


def badges(repo: str) -> str:
    lines = [f"- [![Open {nb.stem} in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"({colab_link(repo, f'notebooks/{nb.name}')}) `{nb.stem}`" for nb in NOTEBOOKS]
    return "<!-- colab badges -->\n" + "\n".join(lines) + "\n<!-- /colab badges -->"


def rewritten(repo: str) -> dict[Path, str]:
    """Each file that holds the address, with the address of ``repo``."""
    out = {nb: URL_LINE.sub(f'REPO_URL = \\\\"{repo}\\\\"', nb.read_text()) for nb in NOTEBOOKS}
    readme = ROOT / "README.md"
    out[readme] = BADGES.sub(lambda _: badges(repo), readme.read_text())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 where a file disagrees")
    args = parser.parse_args()
    repo = repository()
    if not BADGES.search((ROOT / "README.md").read_text()):
        print("README.md: no <!-- colab badges --> block to write the badges into")
        return 1
    stale = [path for path, text in rewritten(repo).items() if text != path.read_text()]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: does not hold {repo}; run python tools/set_repository.py")
        return 1 if stale else 0
    for path, text in rewritten(repo).items():
        write_text(path, text)
    print(f"{repo}: written into {len(NOTEBOOKS)} notebooks and README.md ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
