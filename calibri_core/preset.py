"""Calibri preset files: the public on-disk format of a calibration (see ``docs/preset-format.md``).

A preset is a ``.safetensors`` file holding two float64 tensors, ``scales`` [N, sites] and
``weights`` [N] (ω), and one metadata key ``calibri`` whose value is a JSON object:
``format_version``, ``family``, ``granularity``, ``sites``, ``prompts``, ``counts`` and
``provenance``. Loading never unpickles anything and validates every field; saving is atomic.
This module is pure: no ComfyUI (numpy and safetensors only).

Command line (``python -m calibri_core.preset -h``, implemented in ``calibri_core.preset_cli``)::

    python -m calibri_core.preset inspect FILE
    python -m calibri_core.preset export-json FILE [-o OUT.json]
    python -m calibri_core.preset import cmaes_step_0200.json --pipeline flux --granularity block -o OUT.safetensors
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import PROMPTS, Calibration, Member
from .families import get_family
from .files import check_name_length, write_bytes_atomic
from .sites import GRANULARITIES, SiteLayout, check_counts

FORMAT_VERSION = 1
METADATA_KEY = "calibri"
PRESET_FOLDER = "ComfyUI/models/calibri/"
_REQUIRED = ("format_version", "family", "granularity", "sites", "prompts", "counts")

# Bounds on what a file may make the reader allocate (issue 10). A real preset is a few kB: the largest family
# (1024 blocks at most, sites.MAX_BLOCKS) at gate granularity has ~10⁴ sites.
MAX_FILE_BYTES = 64 * 2 ** 20
MAX_HEADER_BYTES = 8 * 2 ** 20   # the safetensors JSON header, metadata included, read before safetensors parses it
MAX_SITES = 16384
MAX_MEMBERS = 1024
MAX_DEPTH = 64                   # nesting of the metadata JSON (a CalibriCombine of combines adds 4 levels)


def tool_version() -> str:
    """The pack's version: ``pyproject.toml`` beside the package (a checkout), the installed distribution's
    (``pip install .``), or ``"unknown"``."""
    try:
        import tomllib

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except Exception:  # a missing or partial pyproject must never break saving
        pass
    try:
        from importlib import metadata

        return metadata.version("calibri")
    except Exception:
        return "unknown"


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts, found without recursion (a hostile file may nest 50,000 deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _strict_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists); rejects what JSON cannot hold."""
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"Calibri: the preset's {what} nest deeper than {MAX_DEPTH} levels; keep it flat JSON.")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate would only fail when the file is written
        return json.loads(text)
    except UnicodeEncodeError as e:
        raise ValueError(f"Calibri: the preset's {what} holds {e.object[e.start:e.end]!r}, which is not valid "
                         f"Unicode text (a lone surrogate); remove it.") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"Calibri: the preset's {what} must be plain JSON (dicts, lists, strings, finite "
                         f"numbers, booleans, null); {e}.") from None


def _describe(family: str, counts: dict) -> str:
    return f"{family} ({', '.join(f'{k}={v}' for k, v in counts.items())})"


@dataclass(frozen=True)
class Preset:
    """A calibration plus what is needed to explain and reproduce it.

    Args:
        calibration: the scales, ω and prompts of every member (paper §3.2-3.3).
        counts: ``SiteLayout.counts`` of the model it was made for (e.g. ``{"double_blocks": 19,
            "single_blocks": 38}``); must describe a layout whose sites are the calibration's sites.
        provenance: free-form JSON: model name and hash, reward(s), steps, cfg, sampler/scheduler,
            resolution, search statistics, tool version, source, licence.
    """

    calibration: Calibration
    counts: dict
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, Calibration):
            raise ValueError(f"Calibri: a preset needs a Calibration; got {type(self.calibration).__name__}.")
        if not isinstance(self.counts, dict) or not self.counts:
            raise ValueError(f"Calibri: a preset needs the block counts of its model as a non-empty dict "
                             f"(SiteLayout.counts); got {self.counts!r:.80}.")
        check_counts(self.counts)  # before the layout they describe is built
        if not isinstance(self.provenance, dict):
            raise ValueError(f"Calibri: a preset's provenance must be a dict; got {type(self.provenance).__name__}.")
        object.__setattr__(self, "counts", _strict_json(self.counts, "counts"))
        object.__setattr__(self, "provenance", _strict_json(self.provenance, "provenance"))
        layout = self.layout()
        try:
            self.calibration.check_against(layout)
        except ValueError as e:
            raise ValueError(f"Calibri: the preset's sites do not fit its own counts "
                             f"{_describe(layout.family, self.counts)}:\n{e}") from None

    def layout(self) -> SiteLayout:
        """The layout of the model this preset was made for, rebuilt from its counts."""
        family = get_family(self.calibration.family)
        try:
            return family.layout(self.counts)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"Calibri: the preset's counts {self.counts} do not describe a {family.name} "
                             f"({family.title}) model ({type(e).__name__}: {e}). Re-save the preset from the "
                             f"model it was made for.") from None

    def describe(self) -> str:
        return _describe(self.calibration.family, self.counts)

    def check_against(self, layout: SiteLayout) -> None:
        """Raise a ValueError naming both sides if this preset was made for another model than ``layout``."""
        theirs = _strict_json(layout.counts, "counts")
        if self.calibration.family != layout.family or self.counts != theirs:
            raise ValueError(f"Calibri: this preset was made for {self.describe()}; the connected model is "
                             f"{_describe(layout.family, theirs)}. Load a preset made for this model, or run "
                             f"the search for it.")
        self.calibration.check_against(layout)


def _metadata(preset: Preset) -> dict:
    cal = preset.calibration
    return {
        "format_version": FORMAT_VERSION,
        "family": cal.family,
        "granularity": cal.granularity,
        "sites": list(cal.sites),
        "prompts": [m.prompt for m in cal.members],
        "counts": preset.counts,
        "provenance": preset.provenance,
    }


def save_preset(path: str | os.PathLike, preset: Preset, overwrite: bool = False) -> str:
    """Write ``preset`` to ``path`` (a ``.safetensors`` file) atomically.

    The bytes go to a temporary file in the same folder, are fsynced, then ``os.replace`` puts them in
    place, so a crash or error never leaves a half-written or corrupted preset behind.

    Args:
        path: destination; its folder must exist. Presets usually go in ``ComfyUI/models/calibri/``.
        preset: the preset to write.
        overwrite: replace an existing file; without it an existing file is an error.

    Returns:
        the path written.
    """
    from safetensors.numpy import save

    path = os.fspath(path)
    if not isinstance(preset, Preset):
        raise ValueError(f"Calibri: save_preset needs a Preset; got {type(preset).__name__}.")
    if not path.endswith(".safetensors"):
        raise ValueError(f"Calibri: preset file names end in .safetensors; got {path!r}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"Calibri: cannot save {path!r}: folder {folder!r} does not exist. Create it first "
                         f"(presets usually go in {PRESET_FOLDER}).")
    check_name_length(path)
    if not isinstance(overwrite, bool):  # "false" is a true value; only a real boolean may replace a file
        raise ValueError(f"Calibri: overwrite must be True or False; got {overwrite!r:.40}. Nothing was written.")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"Calibri: {path!r} already exists; not overwriting it. Choose another name or ask "
                         f"to overwrite (overwrite=True, --overwrite).")
    cal = preset.calibration
    tensors = {
        "scales": np.array([m.scales for m in cal.members], dtype=np.float64).reshape(len(cal.members), -1),
        "weights": np.array([m.weight for m in cal.members], dtype=np.float64),
    }
    data = save(tensors, metadata={METADATA_KEY: json.dumps(_metadata(preset), allow_nan=False,
                                                             ensure_ascii=False)})
    write_bytes_atomic(path, data)
    return path


def load_preset(path: str | os.PathLike) -> Preset:
    """Read and validate a preset file. Never unpickles: only safetensors and JSON are parsed.

    Raises:
        ValueError: ("Calibri: ...") for a missing file, a file that is not a Calibri preset, invalid
            or unknown-version metadata, tensor shapes that disagree with the metadata, non-finite
            values, an unknown family or counts that do not fit the sites.
    """
    from safetensors import safe_open

    path = os.fspath(path)

    def bad(message: str) -> ValueError:
        return ValueError(f"Calibri: preset {path!r}: {message}")

    if not os.path.exists(path):
        raise ValueError(f"Calibri: preset file {path!r} does not exist. Presets are .safetensors files in "
                         f"{PRESET_FOLDER}; check the name, or make one with the search or CalibriSavePreset.")
    if not os.path.isfile(path):
        raise bad("is not a file; give the path of a .safetensors preset.")
    _check_size(path, bad)
    try:
        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("scales", "weights") if k in keys}
    except Exception as e:  # safetensors raises its own error type for every kind of corrupt file
        raise bad(f"is not a readable safetensors file ({type(e).__name__}: {e}). A Calibri preset is a "
                  f".safetensors file written by Calibri; re-save or re-download it.") from None
    if METADATA_KEY not in header:
        raise bad(f"has no {METADATA_KEY!r} metadata, so it is not a Calibri preset (a model or LoRA file?). "
                  f"Metadata keys found: {sorted(header)}.")
    try:
        meta = json.loads(header[METADATA_KEY], parse_int=parse_small_int)
    except RecursionError:
        raise bad(f"its {METADATA_KEY!r} metadata nests deeper than Python can read; the file is damaged or not "
                  f"made by Calibri, re-save it.") from None
    except ValueError as e:  # JSONDecodeError, and integers of more digits than parse_small_int reads
        raise bad(f"its {METADATA_KEY!r} metadata is not valid JSON ({e}); the file is damaged, re-save it.") from None
    if not isinstance(meta, dict):
        raise bad(f"its {METADATA_KEY!r} metadata must be a JSON object; got {type(meta).__name__}.")
    if _depth(meta) > MAX_DEPTH:
        raise bad(f"its {METADATA_KEY!r} metadata nests deeper than {MAX_DEPTH} levels; a Calibri preset's is "
                  f"flat JSON, re-save it.")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise bad(f"its metadata lacks {missing}; a version-{FORMAT_VERSION} preset has {list(_REQUIRED)} "
                  f"and provenance.")
    version = meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version must be a positive integer; got {version!r}.")
    if version != FORMAT_VERSION:
        raise bad(f"has format_version {version}, but this Calibri reads format_version {FORMAT_VERSION}. "
                  f"Update the Calibri node pack to load it.")
    for key, kind in (("family", str), ("granularity", str), ("sites", list), ("prompts", list),
                      ("counts", dict), ("provenance", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise bad(f"metadata {key!r} must be a {kind.__name__}; got {meta[key]!r:.80}.")
    if meta["granularity"] not in GRANULARITIES:
        raise bad(f"granularity {meta['granularity']!r} is not one of {GRANULARITIES}.")
    for key in ("sites", "prompts"):
        if not all(isinstance(v, str) for v in meta[key]):
            raise bad(f"metadata {key!r} must be a list of strings.")
    sites, prompts = meta["sites"], meta["prompts"]
    if len(sites) > MAX_SITES or len(prompts) > MAX_MEMBERS:
        raise bad(f"names {len(sites)} sites and {len(prompts)} members; a preset has at most {MAX_SITES} sites and "
                  f"{MAX_MEMBERS} members.")
    try:
        check_counts(meta["counts"])
    except ValueError as e:
        raise bad(f"{str(e).removeprefix('Calibri: ')} Re-save the preset from the model it was made for.") from None
    for name in ("scales", "weights"):
        if name not in tensors:
            raise bad(f"has no {name!r} tensor; a preset holds 'scales' [N, sites] and 'weights' [N].")
        if tensors[name].dtype.kind != "f":
            raise bad(f"tensor {name!r} must be floating point (float64); got {tensors[name].dtype}.")
    n = len(prompts)
    if tensors["scales"].shape != (n, len(sites)):
        raise bad(f"tensor 'scales' has shape {list(tensors['scales'].shape)}, but the metadata names {n} members "
                  f"(prompts) and {len(sites)} sites, so [{n}, {len(sites)}] was expected.")
    if tensors["weights"].shape != (n,):
        raise bad(f"tensor 'weights' has shape {list(tensors['weights'].shape)}; [{n}] (one ω per member) "
                  f"was expected.")
    scales = tensors["scales"].astype(np.float64).tolist()
    weights = tensors["weights"].astype(np.float64).tolist()
    try:
        calibration = Calibration(meta["family"], meta["granularity"], tuple(sites), tuple(
            Member(tuple(row), w, p) for row, w, p in zip(scales, weights, prompts)))
        return Preset(calibration, meta["counts"], meta.get("provenance", {}))
    except ValueError as e:
        raise bad(str(e).removeprefix("Calibri: ")) from None


def parse_small_int(text: str) -> int:
    """JSON integers as ``int``, refusing the long ones: int() of a 5,000-digit string fails without naming why."""
    if len(text.lstrip("-")) > 30:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits ({text[:12]}...) is larger than any value a "
                         f"preset holds")
    return int(text)


def _check_size(path: str, bad) -> None:
    """Refuse a file, or a safetensors header, larger than any preset before safetensors parses it."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise bad(f"is {size / 2 ** 20:.0f} MiB, larger than any preset (at most {MAX_FILE_BYTES // 2 ** 20} MiB); "
                  f"is it a model file? Presets are small .safetensors files written by Calibri.")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8:  # shorter files are left to safetensors, which names the problem
        header = int.from_bytes(head, "little")
        if header > MAX_HEADER_BYTES:
            raise bad(f"is not a readable safetensors file: it declares a {header}-byte header, larger than any "
                      f"preset's (at most {MAX_HEADER_BYTES // 2 ** 20} MiB). A Calibri preset is a .safetensors "
                      f"file written by Calibri; re-save or re-download it.")


def preset_to_json(preset: Preset) -> dict:
    """All content of a preset as one JSON-able dict (what ``export-json`` writes)."""
    meta = _metadata(preset)
    meta["members"] = [{"prompt": m.prompt, "weight": m.weight, "scales": dict(zip(preset.calibration.sites,
                                                                                    m.scales))}
                       for m in preset.calibration.members]
    return meta


def combine_presets(parts: list[tuple[Preset, float, str]]) -> Preset:
    """Join calibrations into one ensemble (paper §3.3), in the order given.

    Args:
        parts: (preset, weight, prompt) per input. A one-member input becomes one member with ω = its ω ·
            weight on ``prompt``. An input that is already an ensemble keeps all its members and their own
            prompts, each ω multiplied by ``weight`` (``prompt`` is not used for it).

    Returns:
        a ``Preset`` whose provenance lists the inputs' provenance under ``combined``.

    Raises:
        ValueError: no inputs, or inputs that differ in family, block counts, granularity or sites.
    """
    if not parts:
        raise ValueError("Calibri: nothing to combine; connect at least one calibration.")
    first = parts[0][0]
    members: list[Member] = []
    for k, (preset, weight, prompt) in enumerate(parts, start=1):
        if not isinstance(preset, Preset):
            raise ValueError(f"Calibri: input {k} is not a Calibri calibration (got {type(preset).__name__}).")
        if prompt not in PROMPTS:
            raise ValueError(f"Calibri: input {k}: prompt {prompt!r} must be one of {PROMPTS}.")
        cal, ref = preset.calibration, first.calibration
        if (cal.family, preset.counts) != (ref.family, first.counts):
            raise ValueError(f"Calibri: input {k} was made for {preset.describe()} but input 1 for "
                             f"{first.describe()}; only calibrations of the same model can be combined.")
        if cal.granularity != ref.granularity or cal.sites != ref.sites:
            raise ValueError(f"Calibri: input {k} has {cal.granularity} granularity ({len(cal.sites)} sites) but "
                             f"input 1 has {ref.granularity} ({len(ref.sites)} sites); combined members must share "
                             f"their sites. Rebuild one of them at the other granularity.")
        if len(cal.members) == 1:
            members.append(Member(cal.members[0].scales, cal.members[0].weight * weight, prompt))
        else:
            members += [Member(m.scales, m.weight * weight, m.prompt) for m in cal.members]
    ref = first.calibration
    combined = Calibration(ref.family, ref.granularity, ref.sites, tuple(members))
    provenance = {"source": "CalibriCombine", "combined": [
        {"weight": weight, "prompt": prompt, "members": len(p.calibration.members), "provenance": p.provenance}
        for p, weight, prompt in parts]}
    return Preset(combined, first.counts, provenance)


if __name__ == "__main__":
    # ``python -m calibri_core.preset``: the command line lives in preset_cli, which works on the package's copy of
    # this module, so an imported and a saved Preset are one class.
    from .preset_cli import main

    sys.exit(main())
