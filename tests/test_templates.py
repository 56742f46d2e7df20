"""The example workflows as Templates cards: each has a thumbnail drawn from its own graph (never a picture that
could pass for a model output), kept in step with the JSON, and a saved view that puts its nodes on screen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibri_core.workflow_diagram import SIZE, render_workflow_diagram, write_thumbnails

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_thumbnail_is_the_current_diagram(path):
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run `python -m calibri_core.workflow_diagram " \
                                f"example_workflows`"
    stored = np.asarray(Image.open(thumbnail).convert("RGB"), dtype=np.float32)
    fresh = np.asarray(render_workflow_diagram(json.loads(path.read_text(encoding="utf-8"))), dtype=np.float32)
    assert stored.shape == fresh.shape == (SIZE[1], SIZE[0], 3)
    # JPEG noise is ~1 level on average; an edited graph (a node moved, added or removed) moves far more
    assert np.abs(stored - fresh).mean() < 2.0, f"{thumbnail.name} is stale: run `python -m " \
                                                f"calibri_core.workflow_diagram example_workflows`"


def test_diagram_draws_the_graph_it_is_given():
    workflow = json.loads((WORKFLOW_DIR / "calibri-plot-calibration.json").read_text(encoding="utf-8"))
    base = np.asarray(render_workflow_diagram(workflow), dtype=np.float32)
    moved = json.loads(json.dumps(workflow))
    moved["nodes"][0]["pos"][1] += 300
    assert np.abs(np.asarray(render_workflow_diagram(moved), dtype=np.float32) - base).mean() > 2.0
    calibri = [n for n in workflow["nodes"] if n["type"].startswith("Calibri")]
    assert calibri and (base[..., 2] > base[..., 0] + 60).mean() > 0.05  # Calibri's nodes are drawn in blue


def test_write_thumbnails(tmp_path):
    (tmp_path / "a.json").write_text((WORKFLOW_DIR / "calibri-plot-calibration.json").read_text(encoding="utf-8"))
    assert write_thumbnails(tmp_path) == [tmp_path / "a.jpg"]
    assert Image.open(tmp_path / "a.jpg").size == SIZE


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_saved_view_is_not_the_origin(path):
    """Offset [0, 0] puts the top-left nodes under the frontend's side and tab bars (the browser test measures
    the real view on both frontends)."""
    ds = json.loads(path.read_text(encoding="utf-8"))["extra"]["ds"]
    # below zoom 0.6 the 1.49 frontend draws nodes without their text (its low-quality rendering threshold)
    assert 0.6 <= ds["scale"] <= 1.0 and ds["offset"][0] > 0 and ds["offset"][1] > 0, ds


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_name_fits_its_card(path):
    """The Templates browser captions a pack's card with the bare file name: the 1.32 and 1.49 frontends read no
    title for custom node templates (the human title is drawn in the thumbnail). Past about 30 characters the
    caption is cut off, even in a 1600 px window."""
    assert re.fullmatch(r"calibri-[a-z0-9.]+(-[a-z0-9.]+)*", path.stem) and len(path.stem) <= 28, path.stem
