"""Every relative link and repository path that README.md and search/example_config.toml name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
EXAMPLE_CONFIG = REPO / "search" / "example_config.toml"
# Top-level entries of this repository: a path starting with one of them is a repository path.
TOP_LEVEL = sorted(p.name for p in REPO.iterdir() if not p.name.startswith(".") or p.name == ".ci")
# Folders the docs once named as if they were in the repository (issue 12: the shared reference notes are not).
NOT_IN_REPO = ["reference"]
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH_TOKEN = re.compile(r"(?<![\w/.~$-])((?:\.ci|[A-Za-z_][\w-]*)/[\w./-]*[\w/])")


def markdown_links(text: str) -> list[str]:
    return [t for t in MARKDOWN_LINK.findall(text) if not re.match(r"^[a-z]+:|^#", t)]


def repository_paths(text: str) -> list[str]:
    """Tokens such as ``search/example_config.toml`` or ``calibri_core/families/`` whose first part is a top-level
    entry of the repository (so ``models/calibri`` or ``ComfyUI/models`` are not taken for repository paths)."""
    return sorted({t for t in PATH_TOKEN.findall(text) if t.split("/")[0] in TOP_LEVEL + NOT_IN_REPO})


# A search run dir (``search/runs/flux-block``) is what a documented command creates, not a file of the checkout.
RUN_OUTPUTS = re.compile(r"(^|/)runs/")


def missing(paths, base: Path) -> list[str]:
    return [p for p in paths if not (base / p.split("#")[0]).exists() and not RUN_OUTPUTS.search(p)]


def test_readme_links_and_paths_exist():
    text = README.read_text(encoding="utf-8")
    links = markdown_links(text)
    assert links, "README.md has no relative links: the link parser is broken"
    assert not missing(links, REPO), f"README.md links to missing files: {missing(links, REPO)}"
    paths = repository_paths(text)
    assert "search/example_config.toml" in paths  # the token finder sees what a reader sees
    assert not missing(paths, REPO), f"README.md names missing paths: {missing(paths, REPO)}"


def test_example_config_paths_exist():
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    paths = repository_paths(text)
    assert "search/data/train_prompts.txt" in paths
    assert not missing(paths, REPO), f"example_config.toml names missing paths: {missing(paths, REPO)}"
    # relative string values are taken from the config's own folder
    values = [v for v in re.findall(r'=\s*"([^"/][^"]*\.\w+)"', text) if "/" in v or "." in v.split("/")[-1]]
    files = [v for v in values if re.search(r"\.(txt|toml|json|safetensors|py)$", v)]
    assert not missing(files, EXAMPLE_CONFIG.parent), missing(files, EXAMPLE_CONFIG.parent)


@pytest.mark.parametrize("text,expected", [
    ("see [x](docs/a.md#b) and [y](https://e.org) [z](#anchor)", ["docs/a.md#b"]),
])
def test_link_parser(text, expected):
    assert markdown_links(text) == expected


def test_the_old_dangling_reference_is_caught():
    assert missing(repository_paths("protocol (reference/calibri-reference.md)"), REPO) == \
        ["reference/calibri-reference.md"]


def test_run_dirs_are_outputs_not_missing_files():
    assert missing(["search/runs/flux-block", "search/no-such-file.py"], REPO) == ["search/no-such-file.py"]


def test_path_finder_ignores_user_folders():
    assert repository_paths("put it in `models/calibri` or ComfyUI/models; see `tests/x.py`, .ci/run") == \
        sorted(["tests/x.py"] + ([".ci/run"] if ".ci" in TOP_LEVEL else []))
