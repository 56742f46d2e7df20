"""Preset files: round trip, atomic and refusing writes, and a clear error for every kind of bad file."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from calibri_core.calibration import Calibration, Member
from calibri_core.families import get_family
from calibri_core.preset import Preset, load_preset, save_preset

COUNTS = {"double_blocks": 2, "single_blocks": 3}
TRICKY = [0.1, 1 / 3, -0.0, 5e-324, 999.9999999999999, -1.0, 2.0000000000000004, 0.7, -0.25, 1.0]


def layout(counts=COUNTS):
    return get_family("flux").layout(counts)


def make_preset(granularity="gate", n=2):
    sites = layout().site_names(granularity)
    members = tuple(Member(tuple(TRICKY[(i + j) % len(TRICKY)] for j in range(len(sites))), weight,
                           "positive" if i == 0 else "negative")
                    for i, weight in zip(range(n), (7.0, -6.000000000000001, 0.3)))
    provenance = {"model": {"name": "flux1-dev.safetensors", "sha256": "ab" * 32}, "rewards": ["hpsv3"],
                  "steps": 15, "cfg": 3.5, "sampler": "euler", "scheduler": "simple", "resolution": [512, 512],
                  "search": {"generations": 200, "best": 13.48}, "licence": "CC0-1.0", "note": "ünïcode ω"}
    return Preset(Calibration("flux", granularity, sites, members), dict(COUNTS), provenance)


def raw(path):
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def write(path, meta=None, scales=None, weights=None, extra_metadata=None):
    """A hand-made file: by default a valid 1-member preset for COUNTS at block granularity."""
    sites = list(layout().site_names("block"))
    base = {"format_version": 1, "family": "flux", "granularity": "block", "sites": sites,
            "prompts": ["positive"], "counts": COUNTS, "provenance": {}}
    base.update(meta or {})
    tensors = {"scales": np.ones((1, len(sites))) if scales is None else scales,
               "weights": np.ones(1) if weights is None else weights}
    metadata = {"calibri": json.dumps(base)} if extra_metadata is None else extra_metadata
    save_file({k: v for k, v in tensors.items() if v is not False}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("granularity,n", [("gate", 2), ("layer", 1), ("block", 3)])
def test_round_trip_bit_identical(tmp_path, granularity, n):
    preset = make_preset(granularity, n)
    path = tmp_path / "p.safetensors"
    assert save_preset(path, preset) == str(path)
    loaded = load_preset(path)
    assert loaded == preset
    for a, b in zip(preset.calibration.members, loaded.calibration.members):
        assert struct.pack(f"{len(a.scales)}d", *a.scales) == struct.pack(f"{len(b.scales)}d", *b.scales)
        assert struct.pack("d", a.weight) == struct.pack("d", b.weight)
    meta, tensors = raw(path)
    assert set(meta) == {"calibri"} and set(tensors) == {"scales", "weights"}
    assert tensors["scales"].dtype == np.float64 and tensors["scales"].shape == (n, len(preset.calibration.sites))
    assert tensors["weights"].dtype == np.float64 and tensors["weights"].shape == (n,)
    doc = json.loads(meta["calibri"])
    assert doc == {"format_version": 1, "family": "flux", "granularity": granularity,
                   "sites": list(preset.calibration.sites), "prompts": [m.prompt for m in preset.calibration.members],
                   "counts": COUNTS, "provenance": preset.provenance}
    # saving what was loaded gives the same bytes
    again = tmp_path / "q.safetensors"
    save_preset(again, loaded)
    assert again.read_bytes() == path.read_bytes()


def test_overwrite_refused_unless_asked(tmp_path):
    path = tmp_path / "p.safetensors"
    save_preset(path, make_preset())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists; not overwriting.*overwrite=True"):
        save_preset(path, make_preset("block", 1))
    assert path.read_bytes() == before
    save_preset(path, make_preset("block", 1), overwrite=True)
    assert load_preset(path).calibration.granularity == "block"


def test_failed_save_keeps_existing_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    save_preset(path, make_preset())
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_preset(path, make_preset("block", 1), overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.safetensors"]
    monkeypatch.undo()
    assert load_preset(path) == make_preset()


def test_save_rejects_bad_destination(tmp_path):
    with pytest.raises(ValueError, match=r"end in \.safetensors"):
        save_preset(tmp_path / "p.json", make_preset())
    with pytest.raises(ValueError, match="folder .* does not exist"):
        save_preset(tmp_path / "nope" / "p.safetensors", make_preset())
    with pytest.raises(ValueError, match="needs a Preset"):
        save_preset(tmp_path / "p.safetensors", make_preset().calibration)


def test_missing_file_names_path_and_folder(tmp_path):
    path = tmp_path / "gone.safetensors"
    with pytest.raises(ValueError, match=r"Calibri: preset file '.*gone\.safetensors' does not exist.*models/calibri"):
        load_preset(path)
    with pytest.raises(ValueError, match="is not a file"):
        load_preset(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, I am text", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="Calibri: preset .*bad.safetensors.* not a readable safetensors file"):
        load_preset(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "p.safetensors"
    save_preset(path, make_preset())
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_preset(path)


@pytest.mark.parametrize("kwargs,message", [
    ({"extra_metadata": {}}, "no 'calibri' metadata, so it is not a Calibri preset"),
    ({"extra_metadata": {"format": "pt"}}, r"not a Calibri preset .*\['format'\]"),
    ({"extra_metadata": {"calibri": "{oops"}}, "not valid JSON"),
    ({"extra_metadata": {"calibri": "[1, 2]"}}, "must be a JSON object; got list"),
    ({"meta": {"format_version": 2}}, "format_version 2, but this Calibri reads format_version 1.*Update"),
    ({"meta": {"format_version": "1"}}, "format_version must be a positive integer; got '1'"),
    ({"meta": {"format_version": 0}}, "format_version must be a positive integer; got 0"),
    ({"meta": {"family": "sdxl"}}, "unknown model family 'sdxl'"),
    ({"meta": {"family": 3}}, "'family' must be a str"),
    ({"meta": {"granularity": "row"}}, "granularity 'row' is not one of"),
    ({"meta": {"sites": "double_blocks.0"}}, "'sites' must be a list"),
    ({"meta": {"prompts": ["neutral"]}}, "prompt 'neutral' must be one of"),
    ({"meta": {"counts": [2, 3]}}, "'counts' must be a dict"),
    ({"meta": {"counts": {"double_blocks": 2}}}, "counts .* do not describe a flux"),
    ({"meta": {"counts": {"double_blocks": 4, "single_blocks": 3}}}, "sites do not fit its own counts"),
    ({"meta": {"provenance": "me"}}, "'provenance' must be a dict"),
    ({"scales": np.ones((1, 4))}, r"'scales' has shape \[1, 4\].*\[1, 5\] was expected"),
    ({"scales": np.ones(5)}, r"'scales' has shape \[5\]"),
    ({"weights": np.ones(2)}, r"'weights' has shape \[2\]; \[1\] \(one ω per member\)"),
    ({"meta": {"prompts": ["positive", "negative"]}}, r"2 members .*\[2, 5\] was expected"),
    ({"scales": False}, "has no 'scales' tensor"),
    ({"weights": np.ones(1, dtype=np.int64)}, "'weights' must be floating point"),
    ({"scales": np.array([[1.0, np.nan, 1.0, 1.0, 1.0]])}, r"non-finite scales \(NaN/inf\) at \['double_blocks.1'\]"),
    ({"weights": np.array([np.inf])}, "non-finite output weight"),
])
def test_bad_content(tmp_path, kwargs, message):
    path = write(tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(ValueError, match="Calibri: preset .*bad.safetensors.*" + message):
        load_preset(path)


@pytest.mark.parametrize("key", ["format_version", "family", "granularity", "sites", "prompts", "counts"])
def test_missing_metadata_key(tmp_path, key):
    sites = list(layout().site_names("block"))
    doc = {"format_version": 1, "family": "flux", "granularity": "block", "sites": sites,
           "prompts": ["positive"], "counts": COUNTS}
    del doc[key]
    path = write(tmp_path / "bad.safetensors", extra_metadata={"calibri": json.dumps(doc)})
    with pytest.raises(ValueError, match=f"metadata lacks \\['{key}'\\]"):
        load_preset(path)


def test_hand_made_file_loads_and_float32_is_accepted(tmp_path):
    path = write(tmp_path / "ok.safetensors", scales=np.full((1, 5), 0.5, dtype=np.float32))
    preset = load_preset(path)
    assert preset.calibration.members[0].scales == (0.5,) * 5 and preset.provenance == {}


def test_preset_validation():
    cal = make_preset().calibration
    with pytest.raises(ValueError, match="plain JSON"):
        Preset(cal, dict(COUNTS), {"best": float("nan")})
    with pytest.raises(ValueError, match="plain JSON"):
        Preset(cal, dict(COUNTS), {"when": object()})
    with pytest.raises(ValueError, match="non-empty dict"):
        Preset(cal, {}, {})
    with pytest.raises(ValueError, match="unknown model family"):
        Preset(Calibration("sdxl", "block", ("a",), (Member((1.0,)),)), {"a": 1})
    assert Preset(cal, {"single_blocks": 3, "double_blocks": 2}).counts == COUNTS


def test_check_against_names_both_sides():
    big = Preset(Calibration.identity(get_family("flux").layout({"double_blocks": 19, "single_blocks": 38}), "block"),
                 {"double_blocks": 19, "single_blocks": 38})
    with pytest.raises(ValueError, match=r"made for flux \(double_blocks=19, single_blocks=38\); the connected model "
                                         r"is flux \(double_blocks=4, single_blocks=8\)"):
        big.check_against(get_family("flux").layout({"double_blocks": 4, "single_blocks": 8}))
    sd3 = get_family("sd3").layout({"joint_blocks": 2, "dual_attention_blocks": [0],
                                    "context_pre_only_blocks": [1], "scale_mod_only": False})
    with pytest.raises(ValueError, match=r"made for flux \(double_blocks=19.*connected model is sd3 \(joint_blocks=2"):
        big.check_against(sd3)
    make_preset().check_against(layout())
    Preset(Calibration.identity(sd3, "gate"), dict(sd3.counts)).check_against(
        get_family("sd3").layout({"joint_blocks": 2, "dual_attention_blocks": (0,),
                                  "context_pre_only_blocks": (1,), "scale_mod_only": False}))


def test_python_dash_m_entry_point(tmp_path):
    """``python -m calibri_core.preset`` runs the package's module (one Preset class for import + save)."""
    ref = tmp_path / "cmaes_step_0010.json"
    ref.write_text(json.dumps({"step": 10, "solution": [1.0] * 241, "sigma": 0.2}))
    out = tmp_path / "q.safetensors"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "calibri_core.preset", "import", str(ref), "--pipeline", "qwen-image",
                          "--granularity", "gate", "-o", str(out)], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "calibri_core.preset", "inspect", str(out)], cwd=root,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "transformer_blocks.59.txt.mlp" in run.stdout, run.stderr
