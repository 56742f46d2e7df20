"""The reference's flat vector <-> Calibration, checked against the documented order written out here."""

import json

import pytest

from calibri_core.calibration import Calibration, Member
from calibri_core.families import get_family
from calibri_core.layouts import (
    PIPELINES,
    from_reference_vector,
    import_reference_checkpoint,
    reference_vector_length,
    to_reference_vector,
)
from calibri_core.preset import load_preset
from calibri_core.preset_cli import main

OMEGA = "omega"


# The documented orders (reference/calibri-reference.md, "Flat vector order"), written out independently:
# each returns the meaning (member, site) of every entry of the flat vector.
def flux_block(n, d, s):
    e = [(m, f"double_blocks.{i}") for m in range(n) for i in range(d)]
    e += [(m, f"single_blocks.{i}") for m in range(n) for i in range(s)]
    return e + [(m, OMEGA) for m in range(n)]


def flux_layer(n, d, s):
    e = []
    for m in range(n):
        for i in range(d):
            e += [(m, f"double_blocks.{i}.attn"), (m, f"double_blocks.{i}.mlp")]
    e += [(m, f"single_blocks.{i}") for m in range(n) for i in range(s)]
    return e + [(m, OMEGA) for m in range(n)]


def flux_gate(n, d, s):
    e = []
    for stream in ("img", "txt"):
        for m in range(n):
            for i in range(d):
                e += [(m, f"double_blocks.{i}.{stream}.attn"), (m, f"double_blocks.{i}.{stream}.mlp")]
    e += [(m, f"single_blocks.{i}") for m in range(n) for i in range(s)]
    return e + [(m, OMEGA) for m in range(n)]


def sd3(n, blocks, dual, pre_only):
    e = []
    for m in range(n):
        for i in range(blocks):
            e += [(m, f"joint_blocks.{i}.x.attn"), (m, f"joint_blocks.{i}.x.mlp")]
    for m in range(n):
        for i in range(blocks):
            if i not in pre_only:
                e += [(m, f"joint_blocks.{i}.context.attn"), (m, f"joint_blocks.{i}.context.mlp")]
    for m in range(n):
        e += [(m, f"joint_blocks.{i}.x.attn2") for i in dual]
    return e + [(m, OMEGA) for m in range(n)]


def qwen(n, blocks):
    e = []
    for m in range(n):
        for i in range(blocks):
            e += [(m, f"transformer_blocks.{i}.{k}") for k in ("img.attn", "txt.attn", "img.mlp", "txt.mlp")]
    return e + [(m, OMEGA) for m in range(n)]


CASES = [
    # pipeline, granularity, N, expected meanings, family counts
    ("flux", "block", 1, flux_block(1, 19, 38), None),
    ("flux", "block", 2, flux_block(2, 19, 38), None),
    ("flux", "layer", 1, flux_layer(1, 19, 38), None),
    ("flux", "layer", 2, flux_layer(2, 19, 38), None),
    ("flux", "gate", 1, flux_gate(1, 19, 38), None),
    ("flux", "gate", 2, flux_gate(2, 19, 38), None),
    ("flux", "gate", 3, flux_gate(3, 2, 3), {"double_blocks": 2, "single_blocks": 3}),
    ("sd3.5-medium", "gate", 2, sd3(2, 24, range(13), {23}), None),
    ("sd3.5-large", "gate", 2, sd3(2, 38, [], {37}), None),
    ("qwen-image", "gate", 2, qwen(2, 60), None),
    ("qwen-image", "gate", 1, qwen(1, 60), None),
]


def encoded(meanings):
    """A vector whose every entry tells where it came from: member + (position + 0.25) / 1000 (under 1000 entries;
    small enough to be a scale, calibration.SCALE_LIMIT)."""
    assert len(meanings) < 1000
    return [m + (k + 0.25) / 1000 for k, (m, _) in enumerate(meanings)]


@pytest.mark.parametrize("pipeline,granularity,n,meanings,counts", CASES,
                         ids=[f"{c[0]}-{c[1]}-N{c[2]}" for c in CASES])
def test_every_entry_lands_on_its_site(pipeline, granularity, n, meanings, counts):
    spec = PIPELINES[pipeline]
    layout = get_family(spec.family).layout(counts or spec.counts)
    vector = encoded(meanings)
    assert reference_vector_length(pipeline, granularity, n, counts) == len(vector)
    cal = from_reference_vector(vector, pipeline, granularity, members=n, counts=counts)
    assert cal.family == spec.family and cal.granularity == granularity
    assert cal.sites == layout.site_names(granularity)  # model order, not the flat order
    assert len(cal.members) == n
    seen = set()
    for (m, site), value in zip(meanings, vector):
        if site == OMEGA:
            assert cal.members[m].weight == value
        else:
            assert cal.scales_by_site(m)[site] == value, (m, site)
        seen.add((m, site))
    assert len(seen) == len(vector) == n * (len(cal.sites) + 1)  # every site of every member was covered
    if spec.cfg and n == 2:
        assert [mb.prompt for mb in cal.members] == ["positive", "negative"]
    elif n == 1 or not spec.cfg:
        assert all(mb.prompt == "positive" for mb in cal.members)
    assert to_reference_vector(cal, pipeline, counts) == vector
    # N inferred from the length
    assert from_reference_vector(vector, pipeline, granularity, counts=counts) == cal


def test_documented_lengths():
    assert [reference_vector_length("flux", g, 1) - 1 for g in ("block", "layer", "gate")] == [57, 76, 114]
    assert reference_vector_length("sd3.5-medium", "gate", 2) == 2 * (24 * 2 + 23 * 2 + 13 + 1)
    assert reference_vector_length("sd3.5-large", "gate", 2) == 2 * (38 * 2 + 37 * 2 + 1)
    assert reference_vector_length("qwen-image", "gate", 2) == 2 * (60 * 4 + 1)


def test_vector_from_calibration_site_order_irrelevant():
    layout = get_family("flux").layout({"double_blocks": 2, "single_blocks": 1})
    sites = layout.site_names("gate")
    cal = Calibration("flux", "gate", sites, (Member(tuple(range(len(sites))), 0.5),))
    shuffled = Calibration("flux", "gate", tuple(reversed(sites)),
                           (Member(tuple(reversed(range(len(sites)))), 0.5),))
    counts = dict(layout.counts)
    assert to_reference_vector(cal, "flux", counts) == to_reference_vector(shuffled, "flux", counts)


def test_length_mismatch_says_expected_length():
    with pytest.raises(ValueError, match=r"must have 116 entries.*got 115"):
        from_reference_vector([1.0] * 115, "flux", "block", members=2)
    with pytest.raises(ValueError, match=r"N × \(57 scales \+ 1 ω\).*58, 116.*got 100"):
        from_reference_vector([1.0] * 100, "flux", "block")
    with pytest.raises(ValueError, match=r"must have 216 entries"):
        from_reference_vector([1.0] * 215, "sd3.5-medium", "gate", members=2)


def test_bad_pipeline_granularity_prompts():
    with pytest.raises(ValueError, match="unknown reference pipeline 'sdxl'"):
        from_reference_vector([1.0] * 58, "sdxl", "block")
    with pytest.raises(ValueError, match="no 'block' granularity for qwen-image"):
        from_reference_vector([1.0] * 482, "qwen-image", "block")
    with pytest.raises(ValueError, match="CFG pipeline.*N = 3"):
        from_reference_vector([1.0] * 3 * 241, "qwen-image", "gate")
    cal = from_reference_vector([1.0] * 3 * 241, "qwen-image", "gate", prompts=["positive", "negative", "positive"])
    assert [m.prompt for m in cal.members] == ["positive", "negative", "positive"]
    with pytest.raises(ValueError, match="NaN"):
        from_reference_vector([float("nan")] * 58, "flux", "block")


def test_to_vector_rejects_wrong_family_and_granularity():
    flux = from_reference_vector([1.0] * 58, "flux", "block")
    with pytest.raises(ValueError, match="needs sd3"):
        to_reference_vector(flux, "sd3.5-medium")
    layout = get_family("sd3").layout(PIPELINES["sd3.5-medium"].counts)
    with pytest.raises(ValueError, match="no 'block' granularity"):
        to_reference_vector(Calibration.identity(layout, "block"), "sd3.5-medium")
    small = from_reference_vector([1.0] * 6, "flux", "block", counts={"double_blocks": 2, "single_blocks": 3})
    with pytest.raises(ValueError, match="do not match"):
        to_reference_vector(small, "flux")


def _checkpoint(tmp_path, solution, **extra):
    data = {"step": 200, "train_best": 13.4, "train_mean": 12.1, "val": 13.2, "solution": solution,
            "shapes": {"total": len(solution)}, "sigma": 0.11, "timestamp": "2026-03-01T00:00:00"}
    data.update(extra)
    path = tmp_path / "cmaes_step_0200.json"
    path.write_text(json.dumps(data))
    return path


def test_import_checkpoint_provenance(tmp_path):
    meanings = sd3(2, 24, range(13), {23})
    path = _checkpoint(tmp_path, encoded(meanings), shapes={"n_models": 2, "total": len(meanings)})
    preset = import_reference_checkpoint(str(path), "sd3.5-medium", "gate")
    prov = preset.provenance
    assert prov["source_file"] == "cmaes_step_0200.json" and prov["step"] == 200
    assert prov["train_best"] == 13.4 and prov["val"] == 13.2 and prov["sigma"] == 0.11
    assert prov["model"]["name"] == "SD3.5 Medium"
    assert preset.counts == PIPELINES["sd3.5-medium"].counts
    assert to_reference_vector(preset.calibration, "sd3.5-medium") == encoded(meanings)
    # n_models in shapes disagreeing with the length is an error, not a guess
    path = _checkpoint(tmp_path, encoded(meanings), shapes={"n_models": 3})
    with pytest.raises(ValueError, match="N = 3 members must have 324 entries"):
        import_reference_checkpoint(str(path), "sd3.5-medium", "gate")


def test_import_checkpoint_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        import_reference_checkpoint(str(tmp_path / "nope.json"), "flux", "block")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .* as JSON"):
        import_reference_checkpoint(str(bad), "flux", "block")
    bad.write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match="no 'solution' list"):
        import_reference_checkpoint(str(bad), "flux", "block")
    bad.write_text(json.dumps({"solution": ["a"] * 58}))
    with pytest.raises(ValueError, match="only numbers"):
        import_reference_checkpoint(str(bad), "flux", "block")


def test_cli_import_inspect_export(tmp_path, capsys):
    meanings = flux_layer(2, 19, 38)
    ref = _checkpoint(tmp_path, encoded(meanings), val=float("nan"))
    out = tmp_path / "flux_layer.safetensors"
    assert main(["import", str(ref), "--pipeline", "flux", "--granularity", "layer", "-o", str(out),
                 "--members", "2", "--model-name", "flux1-dev.safetensors"]) == 0
    preset = load_preset(out)
    assert preset.provenance["model"]["name"] == "flux1-dev.safetensors"
    assert "val" not in preset.provenance  # NaN cannot be stored in strict JSON
    assert to_reference_vector(preset.calibration, "flux") == encoded(meanings)
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "family:         flux" in text and "double_blocks.18.mlp" in text and "member 2" in text
    assert "ω" in text and "positive" in text

    assert main(["export-json", str(out)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["format_version"] == 1 and exported["granularity"] == "layer"
    assert exported["members"][1]["scales"]["double_blocks.0.attn"] == 1 + (38 + 0.25) / 1000
    assert exported["members"][0]["weight"] == encoded(meanings)[-2]
    js = tmp_path / "out.json"
    assert main(["export-json", str(out), "-o", str(js)]) == 0
    assert json.loads(js.read_text()) == exported

    # refuses to overwrite without --overwrite; bad input goes through parser.error (exit 2)
    with pytest.raises(SystemExit) as e:
        main(["import", str(ref), "--pipeline", "flux", "--granularity", "layer", "-o", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert main(["import", str(ref), "--pipeline", "flux", "--granularity", "layer", "-o", str(out),
                 "--overwrite"]) == 0
    for argv in (["import", str(ref), "--pipeline", "qwen-image", "--granularity", "block", "-o", str(out)],
                 ["import", str(ref), "--pipeline", "flux", "--granularity", "gate", "-o", str(out), "--overwrite"],
                 ["import", str(tmp_path / "missing.json"), "--pipeline", "flux", "--granularity", "block",
                  "-o", str(out)],
                 ["inspect", str(tmp_path / "missing.safetensors")],
                 ["import", str(ref), "--pipeline", "sdxl", "--granularity", "gate", "-o", str(out)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
