"""CalibriLoadPreset reads the reference's cmaes_step_NNNN.json directly, exactly as the importer converts it."""

from __future__ import annotations

import json

import pytest
import tiny_models as tm

from calibri_core import comfy_env

pack = comfy_env.import_pack()
nodes = pack.nodes

import folder_paths  # noqa: E402

from calibri_core.host import model_layout  # noqa: E402
from calibri_core.layouts import import_reference_checkpoint, reference_vector_length  # noqa: E402


@pytest.fixture(scope="module")
def patcher():
    return tm.build_patcher("flux")  # double_blocks 0-1, single_blocks 0-1


@pytest.fixture
def calibri_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibri", ([str(tmp_path)], {".safetensors", ".json"}))
    return tmp_path


def checkpoint(folder, name, solution, shapes):
    path = folder / name
    path.write_text(json.dumps({"step": 7, "train_best": 1.5, "train_mean": 1.2, "val": None, "solution": solution,
                                "shapes": shapes, "timestamp": 1767225600}))
    return path


def reference_shapes(counts, members, per_double):
    """``shapes`` as the reference writes it (src/optim/cmaes.py ``_vector_shapes``)."""
    doubles = members * counts["double_blocks"] * per_double
    singles = members * counts["single_blocks"]
    return {"doubles": doubles, "singles": singles, "models": members, "total": doubles + singles + members,
            "n_double": counts["double_blocks"], "n_single": counts["single_blocks"], "n_models": members}


def same(a, b) -> bool:
    return (a.family, a.granularity, a.sites) == (b.family, b.granularity, b.sites) and \
        [(m.scales, m.weight, m.prompt) for m in a.members] == [(m.scales, m.weight, m.prompt) for m in b.members]


def load(preset, model=None):
    return nodes.CalibriLoadPreset.execute(preset=preset, model=model)[0]


@pytest.mark.parametrize("granularity,per_double,members", [("layer", 2, 1), ("gate", 4, 2), ("block", 1, 1)])
def test_listed_and_loaded_as_the_importer_converts_it(patcher, calibri_folder, granularity, per_double, members):
    layout = model_layout(patcher)[1]
    n = reference_vector_length("flux", granularity, members, layout.counts)
    solution = [round(0.5 + 0.01 * i, 4) for i in range(n)]
    path = checkpoint(calibri_folder, "cmaes_step_0007.json", solution,
                      reference_shapes(layout.counts, members, per_double))
    (calibri_folder / "notes.json").write_text("{}")  # any other JSON is not offered
    assert nodes.preset_nodes.preset_choices() == ["cmaes_step_0007.json"]
    assert nodes.CalibriLoadPreset.validate_inputs(preset="cmaes_step_0007.json") is True
    loaded = load("cmaes_step_0007.json", patcher)
    expected = import_reference_checkpoint(str(path), "flux", granularity, counts=layout.counts,
                                           model_name=layout.describe())
    # (compared by fields: the pack's calibri_core classes are other objects than the test's)
    assert same(loaded.calibration, expected.calibration) and loaded.counts == expected.counts
    assert loaded.provenance == expected.provenance
    # and it is a CALIBRI value the other nodes take
    nodes.CalibriEnsemble.execute(model=patcher, calibration=loaded, start_percent=0.0, end_percent=1.0)


def test_length_alone_decides_when_unambiguous(patcher, calibri_folder):
    layout = model_layout(patcher)[1]
    n = reference_vector_length("flux", "gate", 1, layout.counts)  # 11: 5 · k or 7 · k fit no other granularity
    checkpoint(calibri_folder, "cmaes_step_0001.json", [1.0] * n, {"total": n})
    assert load("cmaes_step_0001.json", patcher).calibration.granularity == "gate"


def test_ambiguous_or_mismatched_files_name_the_import_command(patcher, calibri_folder):
    layout = model_layout(patcher)[1]
    # 35 values: 7 members at block (4 sites + ω) or 5 at layer (6 + ω), and shapes says neither
    checkpoint(calibri_folder, "cmaes_step_0002.json", [1.0] * 35, {"total": 35})
    with pytest.raises(ValueError, match=r"fit block and layer.*python -m calibri_core.preset import "
                                         r"cmaes_step_0002.json --pipeline flux --granularity block\|layer"):
        load("cmaes_step_0002.json", patcher)
    checkpoint(calibri_folder, "cmaes_step_0003.json", [1.0] * 13, {"total": 13})
    with pytest.raises(ValueError, match="fit no granularity"):
        load("cmaes_step_0003.json", patcher)
    wrong = dict(layout.counts, double_blocks=19)
    checkpoint(calibri_folder, "cmaes_step_0004.json", [1.0] * 7, reference_shapes(wrong, 1, 2))
    with pytest.raises(ValueError, match="searched on a model with 19 double_blocks"):
        load("cmaes_step_0004.json", patcher)
    with pytest.raises(ValueError, match="connect the model it was searched for"):
        load("cmaes_step_0004.json")
    other = tm.build_patcher("lumina2")
    with pytest.raises(ValueError, match="no pipeline for the connected model lumina2"):
        load("cmaes_step_0004.json", other)
