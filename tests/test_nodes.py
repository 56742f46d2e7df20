"""The Calibri nodes, called through their V3 ``execute`` on tiny CPU models (no server)."""

from __future__ import annotations

import os
import pathlib

import pytest
import tiny_models as tm
import torch

from calibri_core import comfy_env

pack = comfy_env.import_pack()
nodes = pack.nodes

import folder_paths  # noqa: E402  (ComfyUI's, importable once the host is active)

from calibri_core.host import PATCH_KEY  # noqa: E402
from calibri_core.sampling import ENSEMBLE_KEY  # noqa: E402

SIGMA = 0.7

# The public contract: node ids and input names never change once released.
CONTRACT = {
    "CalibriLoadPreset": ["preset", "model"],
    "CalibriApply": ["model", "calibration", "strength", "start_percent", "end_percent"],
    "CalibriManual": ["model", "granularity", "text"],
    "CalibriCombine": [f"{name}_{k}" for k in range(1, 5) for name in ("calibration", "weight", "prompt")],
    "CalibriEnsembleGuider": ["model", "positive", "negative", "calibration", "start_percent", "end_percent",
                              "rescale", "low_vram"],
    "CalibriEnsemble": ["model", "calibration", "start_percent", "end_percent"],
    "CalibriSavePreset": ["calibration", "filename", "overwrite"],
    "CalibriPlot": ["calibration"],
    "CalibriSweep": ["model", "granularity", "scale", "sites"],
}
OUTPUTS = {"CalibriLoadPreset": ["CALIBRI"], "CalibriApply": ["MODEL"], "CalibriManual": ["CALIBRI"],
           "CalibriCombine": ["CALIBRI"], "CalibriEnsembleGuider": ["GUIDER"], "CalibriEnsemble": ["MODEL"],
           "CalibriSavePreset": [], "CalibriPlot": ["IMAGE"], "CalibriSweep": ["MODEL", "STRING"]}


@pytest.fixture(scope="module")
def patcher():
    return tm.build_patcher("flux")


@pytest.fixture
def calibri_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibri", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def manual(patcher, text: str, granularity: str = "block"):
    return nodes.CalibriManual.execute(model=patcher, granularity=granularity, text=text)[0]


def combine(*parts):
    kwargs = {}
    for k, (calibration, weight, prompt) in enumerate(parts, start=1):
        kwargs.update({f"calibration_{k}": calibration, f"weight_{k}": weight, f"prompt_{k}": prompt})
    return nodes.CalibriCombine.execute(**kwargs)[0]


# ---------------------------------------------------------------- contract

def test_node_ids_inputs_and_outputs_are_pinned():
    schemas = {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in nodes.NODE_CLASSES}
    assert list(schemas) == list(CONTRACT)
    for node_id, schema in schemas.items():
        assert [i.id for i in schema.inputs] == CONTRACT[node_id], node_id
        assert [o.io_type for o in schema.outputs] == OUTPUTS[node_id], node_id
        assert schema.category == "Calibri"
        assert schema.description
        assert all(i.tooltip for i in schema.inputs), f"{node_id}: every input needs a tooltip"
        assert all(o.tooltip for o in schema.outputs), f"{node_id}: every output needs a tooltip"
    assert schemas["CalibriSavePreset"].is_output_node and schemas["CalibriPlot"].is_output_node


def test_only_one_module_imports_the_node_api():
    importers = [p.name for p in pathlib.Path(nodes.__file__).parent.glob("*.py") if "comfy_api" in p.read_text()]
    assert importers == ["common.py"]


def test_pack_entry_point_lists_the_nodes():
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert [c.GET_SCHEMA().node_id for c in listed] == list(CONTRACT)


def test_folder_registration_extends_an_existing_entry(monkeypatch, tmp_path):
    models = os.path.join(folder_paths.models_dir, "calibri")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibri", ([str(tmp_path)], set()))
    nodes.common.register_folder()
    paths = folder_paths.get_folder_paths("calibri")
    assert paths[0] == str(tmp_path) and models in paths and nodes.common.PRESETS_DIR in paths
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "calibri")
    nodes.common.register_folder()
    assert folder_paths.folder_names_and_paths["calibri"] == ([models, nodes.common.PRESETS_DIR],
                                                              {".safetensors", ".json"})


# ---------------------------------------------------------------- Manual

def test_manual_builds_a_calibration_for_the_connected_model(patcher):
    preset = manual(patcher, "single_blocks.1 = 0  # bypass\ndouble_blocks.0-1 = 1.5\nweight = 1.3")
    cal = preset.calibration
    assert (cal.family, cal.granularity, preset.counts) == ("flux", "block", {"double_blocks": 2, "single_blocks": 2})
    assert cal.scales_by_site() == {"double_blocks.0": 1.5, "double_blocks.1": 1.5, "single_blocks.0": 1.0,
                                    "single_blocks.1": 0.0}
    assert cal.members[0].weight == 1.3
    assert preset.provenance["source"] == "CalibriManual"


def test_manual_errors(patcher):
    with pytest.raises(ValueError, match=r"single_blocks\.40 does not exist; this model has single_blocks\.0-1"):
        manual(patcher, "single_blocks.40 = 0")
    with pytest.raises(ValueError, match=r"line 1 .*not a number"):
        manual(patcher, "single_blocks.1 = x")
    # the syntax is checked before the run, without a model
    assert nodes.CalibriManual.validate_inputs(text="single_blocks.1 = 0\n# ok") is True
    message = nodes.CalibriManual.validate_inputs(text="\nsingle_blocks.1 = nan")
    assert isinstance(message, str) and "line 2" in message and "finite" in message
    # the default text is valid and is the identity
    default = next(i.default for i in nodes.CalibriManual.GET_SCHEMA().inputs if i.id == "text")
    assert set(manual(patcher, default).calibration.members[0].scales) == {1.0}


# ---------------------------------------------------------------- Apply

def test_apply_clones_and_registers_under_calibri(patcher):
    x, positive = tm.latent("flux"), tm.conditioning("flux")
    before = tm.predict(patcher, x, SIGMA, positive)
    patch_count = len(patcher.object_patches)
    preset = manual(patcher, "single_blocks.1 = 0\ndouble_blocks.0 = 1.4")
    out = nodes.CalibriApply.execute(model=patcher, calibration=preset, strength=1.0, start_percent=0.0,
                                     end_percent=1.0)[0]
    assert out is not patcher
    assert PATCH_KEY in out.wrappers.get("apply_model", {})
    assert PATCH_KEY not in patcher.wrappers.get("apply_model", {})
    assert len(patcher.object_patches) == patch_count
    assert (tm.predict(out, x, SIGMA, positive) - before).abs().max() > 1e-4
    assert torch.equal(tm.predict(patcher, x, SIGMA, positive), before)


def test_apply_strength_zero_is_identical(patcher):
    x, positive = tm.latent("flux"), tm.conditioning("flux")
    preset = manual(patcher, "single_blocks.0-1 = 0\nweight = 1.5")
    off = nodes.CalibriApply.execute(model=patcher, calibration=preset, strength=0.0, start_percent=0.0,
                                     end_percent=1.0)[0]
    assert torch.equal(tm.predict(off, x, SIGMA, positive), tm.predict(patcher, x, SIGMA, positive))


def test_apply_refuses_ensembles_and_other_models(patcher):
    one = manual(patcher, "single_blocks.1 = 0")
    two = combine((one, 1.0, "positive"), (one, -1.0, "negative"))
    with pytest.raises(ValueError, match="2 members.*CalibriEnsemble.*CalibriEnsembleGuider"):
        nodes.CalibriApply.execute(model=patcher, calibration=two, strength=1.0, start_percent=0.0, end_percent=1.0)
    sd3 = tm.build_patcher("sd3")
    with pytest.raises(ValueError, match=r"made for flux \(double_blocks=2, single_blocks=2\); the connected model is "
                                         r"sd3"):
        nodes.CalibriApply.execute(model=sd3, calibration=one, strength=1.0, start_percent=0.0, end_percent=1.0)


def test_apply_validates_the_range():
    assert nodes.CalibriApply.validate_inputs(start_percent=0.2, end_percent=0.8) is True
    assert "must not exceed" in nodes.CalibriApply.validate_inputs(start_percent=0.9, end_percent=0.1)


# ---------------------------------------------------------------- Combine

def test_combine_node(patcher):
    a = manual(patcher, "single_blocks.1 = 0\nweight = 2")
    b = manual(patcher, "double_blocks.0 = 0.5")
    out = nodes.CalibriCombine.execute(calibration_1=a, weight_1=1.5, prompt_1="positive", calibration_2=None,
                                       weight_2=1.0, prompt_2="positive", calibration_3=b, weight_3=-0.5,
                                       prompt_3="negative", weight_4=1.0, prompt_4="positive")[0]
    assert [(m.weight, m.prompt) for m in out.calibration.members] == [(3.0, "positive"), (-0.5, "negative")]
    nested = combine((out, 2.0, "negative"), (a, 1.0, "positive"))  # an ensemble input keeps its prompts
    assert [(m.weight, m.prompt) for m in nested.calibration.members] == [(6.0, "positive"), (-1.0, "negative"),
                                                                          (2.0, "positive")]
    with pytest.raises(ValueError, match="nothing to combine"):
        nodes.CalibriCombine.execute(weight_1=1.0, prompt_1="positive")
    gate = manual(patcher, "", "gate")
    with pytest.raises(ValueError, match="input 2 has gate granularity"):
        combine((a, 1.0, "positive"), (gate, 1.0, "negative"))


# ---------------------------------------------------------------- ensembles

def test_ensemble_guider_samples_and_matches_cfg(patcher):
    import comfy.samplers

    identity = manual(patcher, "")
    cfg_like = combine((identity, 2.0, "positive"), (identity, -1.0, "negative"))  # ω = (cfg, 1 − cfg), cfg 2
    positive, negative = tm.conditioning("flux", seed=11), tm.conditioning("flux", seed=12)
    guider = nodes.CalibriEnsembleGuider.execute(model=patcher, positive=positive, negative=negative,
                                                 calibration=cfg_like, start_percent=0.0, end_percent=1.0,
                                                 rescale="off", low_vram=False)[0]
    assert isinstance(guider, comfy.samplers.CFGGuider)
    plain = comfy.samplers.CFGGuider(patcher)
    plain.set_cfg(2.0)
    ours = tm.sample_with_guider(guider, "flux", seed=4, steps=3)
    reference = tm.sample_with_guider(plain, "flux", seed=4, steps=3)
    assert torch.isfinite(ours).all()
    assert (ours - reference).abs().max() <= 1e-4

    calibrated = combine((manual(patcher, "single_blocks.0 = 0"), 2.0, "positive"), (identity, -1.0, "negative"))
    guider = nodes.CalibriEnsembleGuider.execute(model=patcher, positive=positive, negative=negative,
                                                 calibration=calibrated, start_percent=0.0, end_percent=1.0,
                                                 rescale="positive_norm", low_vram=True)[0]
    out = tm.sample_with_guider(guider, "flux", seed=4, steps=3)
    assert torch.isfinite(out).all() and (out - reference).abs().max() > 1e-4


def test_ensemble_model_for_ksampler(patcher):
    one = manual(patcher, "single_blocks.0 = 0")
    ensemble = combine((one, 1.5, "positive"), (manual(patcher, "double_blocks.1 = 0.5"), -0.5, "positive"))
    out = nodes.CalibriEnsemble.execute(model=patcher, calibration=ensemble, start_percent=0.0, end_percent=1.0)[0]
    assert out is not patcher and PATCH_KEY in out.wrappers.get("apply_model", {})
    assert out.get_wrappers("calc_cond_batch", ENSEMBLE_KEY) and out.get_wrappers("predict_noise", ENSEMBLE_KEY)
    assert not patcher.get_wrappers("calc_cond_batch", ENSEMBLE_KEY)
    base = tm.sample(patcher, "flux", seed=3, cfg=1.0)
    first = tm.sample(out, "flux", seed=3, cfg=1.0)
    assert torch.isfinite(first).all() and (first - base).abs().max() > 1e-4
    # an identity member with ω = 1 leaves the KSampler's result unchanged
    identity = nodes.CalibriEnsemble.execute(model=patcher, calibration=manual(patcher, ""), start_percent=0.0,
                                             end_percent=1.0)[0]
    assert (tm.sample(identity, "flux", seed=3, cfg=1.0) - base).abs().max() <= 1e-5


# ---------------------------------------------------------------- presets

def test_save_load_round_trip(patcher, calibri_folder):
    ensemble = combine((manual(patcher, "single_blocks.1 = 0\nweight = 1.2"), 1.0, "positive"),
                       (manual(patcher, "double_blocks.0 = 0.25"), -0.5, "negative"))
    result = nodes.CalibriSavePreset.execute(calibration=ensemble, filename="my-preset", overwrite=False)
    path = calibri_folder / "my-preset.safetensors"
    assert path.is_file() and str(path) in result.ui["text"][0]
    options = next(i.options for i in nodes.CalibriLoadPreset.GET_SCHEMA().inputs if i.id == "preset")
    assert "my-preset.safetensors" in options
    loaded = nodes.CalibriLoadPreset.execute(preset="my-preset.safetensors")[0]
    assert loaded.calibration == ensemble.calibration and loaded.counts == ensemble.counts
    assert loaded.provenance["source"] == "CalibriCombine"
    assert {"tool_version", "date"} <= set(loaded.provenance["saved"])
    # refuses to overwrite unless asked
    with pytest.raises(ValueError, match="already exists"):
        nodes.CalibriSavePreset.execute(calibration=ensemble, filename="my-preset.safetensors", overwrite=False)
    single = manual(patcher, "single_blocks.0 = 2")
    nodes.CalibriSavePreset.execute(calibration=single, filename="my-preset", overwrite=True)
    assert nodes.CalibriLoadPreset.execute(preset="my-preset.safetensors")[0].calibration == single.calibration


def test_save_creates_the_folder(patcher, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "calibri"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibri", ([str(folder)], {".safetensors"}))
    nodes.CalibriSavePreset.execute(calibration=manual(patcher, ""), filename="x", overwrite=False)
    assert (folder / "x.safetensors").is_file()


@pytest.mark.parametrize("name", ["", "  ", "../evil", "a/b", "a\\b", ".hidden", "a..b", "what?", "x:y"])
def test_save_rejects_bad_names(name):
    message = nodes.CalibriSavePreset.validate_inputs(filename=name)
    assert isinstance(message, str) and "not a valid preset name" in message


def test_save_accepts_plain_names():
    assert nodes.CalibriSavePreset.validate_inputs(filename="flux-dev_hpsv3 v2") is True
    assert nodes.CalibriSavePreset.validate_inputs(filename="flux.safetensors") is True


def test_load_errors(calibri_folder):
    with pytest.raises(ValueError, match="'nope.safetensors' was not found in any calibri folder"):
        nodes.CalibriLoadPreset.execute(preset="nope.safetensors")
    (calibri_folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        nodes.CalibriLoadPreset.execute(preset="broken.safetensors")


# ---------------------------------------------------------------- Plot

def test_plot_returns_one_chart_per_member(patcher):
    ensemble = combine((manual(patcher, "single_blocks.1 = 0\ndouble_blocks.0 = 1.8", "gate"), 1.0, "positive"),
                       (manual(patcher, "", "gate"), -1.0, "negative"))
    image = nodes.CalibriPlot.execute(calibration=ensemble)[0]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.ndim == 4 and image.shape[0] == 2 and image.shape[3] == 3 and image.shape[1] >= 256
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05  # not blank
    assert not torch.equal(image[0], image[1])  # different members, different charts
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    assert red.sum(dim=(1, 2)).min() > image.shape[2]  # the identity line crosses every chart
