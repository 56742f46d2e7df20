"""Prompt files for the search: one prompt per line (the format of T2I-CompBench++'s split files).

Blank lines and lines starting with ``#`` are skipped (as ``search.config.read_prompts`` does) and surrounding
whitespace is stripped; every other line is one prompt, verbatim.
The default sets in ``search/data/`` were written for this project: ``train_prompts.txt`` (compositional prompts:
attribute binding, counting, spatial and non-spatial relations, complex scenes) and ``val_prompts.txt`` (held out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_FILES = {"train": DATA / "train_prompts.txt", "val": DATA / "val_prompts.txt"}
MAX_CHARS = 2000


def read_prompts(path: Union[str, Path]) -> list[str]:
    """Read and validate a prompt file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no prompt, is not UTF-8 text, or a line is implausibly long.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Calibri: prompt file not found: {path}. Give a text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Calibri: prompt file {path} is not UTF-8 text ({e}).") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if len(prompt) > MAX_CHARS:
            raise ValueError(f"Calibri: line {number} of {path} has {len(prompt)} characters (at most {MAX_CHARS}); "
                             "is this really a prompt file with one prompt per line?")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"Calibri: prompt file {path} holds no prompts (it is empty, or only blank and '#' lines). "
                         "Write one prompt per line.")
    return prompts


def default_prompts(split: str = "train") -> list[str]:
    """The project's default prompt set: ``train`` or ``val``."""
    if split not in DEFAULT_FILES:
        raise ValueError(f"Calibri: unknown prompt split {split!r}; expected one of {sorted(DEFAULT_FILES)}.")
    return read_prompts(DEFAULT_FILES[split])


def load_prompts(source: Union[str, Path, None], split: str = "train") -> list[str]:
    """A prompt list from a file path, or the default ``split`` when ``source`` is None or ``"default"``."""
    if source is None or str(source) == "default":
        return default_prompts(split)
    return read_prompts(source)
