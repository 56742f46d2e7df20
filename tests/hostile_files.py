"""Hostile preset files (issue 10), shared by tests/test_hostile_input.py (in-process, CLI) and
tests/test_hostile_server.py (through a real server's /prompt).

Every case starts from a *valid* preset (its parsed ``calibri`` metadata and its tensors), so the same cases fit any
family and block counts, and changes one thing. ``preset_bytes`` writes the safetensors bytes by hand, so a case can
also hold what safetensors' own writer refuses (invalid UTF-8, non-string metadata, a lying header length).
"""

from __future__ import annotations

import json
import struct

import numpy as np
from safetensors import safe_open

_DTYPES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("int64"): "I64"}


def read_preset(path) -> tuple[dict, dict]:
    """The parsed ``calibri`` metadata and the tensors of a valid preset file."""
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["calibri"]), {k: f.get_tensor(k) for k in f.keys()}


def preset_bytes(metadata, tensors: dict) -> bytes:
    """A safetensors file: ``metadata`` is the ``__metadata__`` object (or raw JSON bytes for the whole header
    without tensor entries)."""
    entries, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        entries[name] = {"dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                         "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if isinstance(metadata, bytes):  # a hand-made header: the caller's bytes where the metadata object goes
        header = b'{"__metadata__":' + metadata + b"," + json.dumps(entries).encode()[1:]
    else:
        header = json.dumps({"__metadata__": metadata, **entries}, ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(blobs)


def _meta(meta: dict, tensors: dict, **changes) -> bytes:
    return preset_bytes({"calibri": json.dumps(dict(meta, **changes))}, tensors)


def _counts(meta: dict, tensors: dict, **changes) -> bytes:
    return _meta(meta, tensors, counts=dict(meta["counts"], **changes))


def _first_count(meta: dict) -> str:
    return next(k for k, v in meta["counts"].items() if isinstance(v, int) and not isinstance(v, bool))


def _list_count(meta: dict) -> str:
    """The counts' block list (SD3's dual_attention_blocks, read once per block: the quadratic case), or a new key."""
    return next((k for k, v in meta["counts"].items() if isinstance(v, list)), "extra_blocks")


def _tensor(meta: dict, tensors: dict, name: str, value: float) -> bytes:
    changed = {k: v.copy() for k, v in tensors.items()}
    changed[name].reshape(-1)[0] = value
    return _meta(meta, changed)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, make(meta, tensors) -> file bytes, a regular expression the refusal must match, case-insensitively)
CASES = [
    ("counts-1e9", lambda m, t: _counts(m, t, **{_first_count(m): 10 ** 9}), r"outside 0\.\.1024"),
    ("counts-list-200k", lambda m, t: _counts(m, t, **{_list_count(m): list(range(200_000))}),
     r"lists 200000 blocks"),
    ("counts-negative", lambda m, t: _counts(m, t, **{_first_count(m): -3}), r"outside 0\.\.1024"),
    ("counts-float", lambda m, t: _counts(m, t, **{_first_count(m): 4.5}), r"must be an integer"),
    ("counts-nested", lambda m, t: _counts(m, t, **{_first_count(m): {"a": [1]}}), r"must be an integer"),
    ("counts-not-object", lambda m, t: _meta(m, t, counts=[1, 2]), r"'counts' must be a dict"),
    ("counts-too-many-keys", lambda m, t: _counts(m, t, **{f"k{i}": 1 for i in range(40)}), r"1 to 16 keys"),
    ("nested-50000", lambda m, t: preset_bytes(
        {"calibri": json.dumps(m)[:-1] + ', "x": ' + _nested(50_000) + "}"}, t), r"nests deeper"),
    ("nested-200", lambda m, t: preset_bytes(
        {"calibri": json.dumps(m)[:-1] + ', "x": ' + _nested(200) + "}"}, t), r"nests deeper than 64"),
    ("int-5000-digits", lambda m, t: preset_bytes(
        {"calibri": json.dumps(m)[:-1] + ', "x": ' + "7" * 5000 + "}"}, t), r"integer of 5000 digits"),
    ("invalid-utf8", lambda m, t: preset_bytes(b'{"calibri": "\xff\xfe{\xc3("}', t), r"not a readable safetensors"),
    ("non-string-metadata", lambda m, t: preset_bytes(b'{"calibri": {"format_version": 1}}', t),
     r"not a readable safetensors"),
    ("metadata-not-json", lambda m, t: preset_bytes({"calibri": "{format_version: 1"}, t), r"not valid JSON"),
    ("metadata-array", lambda m, t: preset_bytes({"calibri": "[1, 2]"}, t), r"must be a JSON object"),
    ("header-length-2^40", lambda m, t: struct.pack("<Q", 2 ** 40) + b"{}", r"declares a 1099511627776-byte"),
    ("header-9MiB", lambda m, t: preset_bytes({"calibri": json.dumps(m), "pad": "x" * (9 * 2 ** 20)}, t),
     r"larger than any preset"),
    ("sites-20000", lambda m, t: _meta(m, t, sites=[f"s{i}" for i in range(20_000)]), r"at most 16384 sites"),
    ("sites-repeated", lambda m, t: _meta(m, t, sites=[m["sites"][0]] * len(m["sites"])), r"must be unique"),
    ("scale-1e300", lambda m, t: _tensor(m, t, "scales", 1e300), r"scale at .* is 1e\+300, outside"),
    ("scale-nan", lambda m, t: _tensor(m, t, "scales", float("nan")), r"non-finite scales"),
    ("weight-1e308", lambda m, t: _tensor(m, t, "weights", 1e308), r"output weight ω is 1e\+308, outside"),
    ("weight-inf", lambda m, t: _tensor(m, t, "weights", float("inf")), r"non-finite output weight"),
    ("family-unknown", lambda m, t: _meta(m, t, family="../../etc/passwd"), r"unknown model family"),
    ("format-version-huge", lambda m, t: _meta(m, t, format_version=10 ** 20), r"format_version"),
    ("granularity-bad", lambda m, t: _meta(m, t, granularity="cell"), r"granularity 'cell'"),
    ("prompt-bad", lambda m, t: _meta(m, t, prompts=["sideways"] * len(m["prompts"])), r"prompt 'sideways'"),
    ("tensor-int", lambda m, t: preset_bytes({"calibri": json.dumps(m)},
                                             dict(t, scales=t["scales"].astype(np.int64))), r"floating point"),
    ("tensor-shape", lambda m, t: preset_bytes({"calibri": json.dumps(m)},
                                               dict(t, scales=np.ones((7, 3)))), r"has shape \[7, 3\]"),
    ("not-safetensors", lambda m, t: b"this is a text file, not a preset\n" * 20, r"not a readable safetensors"),
    ("empty", lambda m, t: b"", r"not a readable safetensors"),
    ("truncated", lambda m, t: _meta(m, t)[:-5], r"not a readable safetensors"),
]
