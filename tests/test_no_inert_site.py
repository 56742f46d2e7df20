"""No inert site: every site of every family, at every granularity, acts, and acts as its independent reference.

A site whose patch never runs (a module the model stopped calling, a forward bypassed by a subclass) would leave the
prediction unchanged while the node reports success. Here each site alone is scaled away from 1 on its family's
tiny model; the prediction must move, and must equal the family's independent reference (tests/engine_reference.py:
weight folding or hooks that never touch Calibri's mechanism) with the same gates scaled. The only sites allowed to
be inert are those a family table declares ``discarded`` (a branch whose output the model throws away).

Text-stream gates of the tiny models move the output by as little as 1e-5, so "moves" means: not bit-identical to
the unscaled prediction, and reproduced by the reference to 1 % of the move or to fp32 rounding (8 ulp of the
output's scale), whichever is larger.
"""

from __future__ import annotations

import re

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher

from calibri_core import Calibration, Member
from calibri_core.families import FAMILIES, detect
from calibri_core.host import apply_calibration, model_layout
from calibri_core.sites import GRANULARITIES

SIGMA = 0.7
SCALE = 1.6
ATOL = 1e-5
REPRODUCED = 0.01
ROUNDING = 1e-6  # relative to max |prediction|: about 8 fp32 ulp


@pytest.fixture(scope="module", params=tm.FAMILIES)
def spec_name(request):
    return request.param


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_site_changes_the_prediction_as_its_reference_does(spec_name, granularity):
    patcher = tm.build_patcher(spec_name)
    family, layout = model_layout(patcher)
    discarded = set(family.discarded(layout.counts)) if granularity == "gate" else set()
    x, positive = tm.latent(spec_name), tm.conditioning(spec_name)
    base = tm.predict(patcher, x, SIGMA, positive)
    scale = float(base.abs().max())
    sites = layout.site_names(granularity)
    gate_site = layout.gate_to_site(granularity)
    inert, wrong = [], []
    for index, site in enumerate(sites):
        scales = tuple(SCALE if i == index else 1.0 for i in range(len(sites)))
        calibration = Calibration(layout.family, granularity, sites, (Member(scales),))
        ours = tm.predict(apply_calibration(patcher, calibration), x, SIGMA, positive)
        gates = {g: SCALE for g, s in enumerate(gate_site) if s == index}
        reference = tm.predict(reference_patcher(spec_name, gates), x, SIGMA, positive)
        moved = float((ours - base).abs().max())
        if moved == 0.0:
            inert.append(site)
        error = float((ours - reference).abs().max())
        if not (error <= ATOL and error <= max(REPRODUCED * moved, ROUNDING * scale)) and site not in discarded:
            wrong.append(f"{site} (moved {moved:.2e}, |ours - reference| = {error:.2e})")
    assert sorted(inert) == sorted(discarded), (
        f"{spec_name}: sites that do nothing at {granularity} granularity: {inert}; declared discarded: {discarded}")
    assert not wrong, f"{spec_name}: sites that differ from the reference at {granularity} granularity: {wrong}"
    assert torch.isfinite(base).all()


def _spec_classes() -> dict[str, str]:
    """The diffusion-model class each tiny spec builds on this host → the spec's name (specs the host lacks skip)."""
    built = {}
    for name in tm.SPECS:
        try:
            model = tm.build_model(name)
        except pytest.skip.Exception:
            continue
        built[f"{type(model.diffusion_model).__module__}.{type(model.diffusion_model).__qualname__}"] = name
    return built


def _host_family_classes() -> set[type]:
    """Every class this host defines that is, or derives from, a class some family table lists."""
    import importlib
    import pkgutil

    import comfy.ldm
    import comfy.model_base  # noqa: F401  (the model modules ComfyUI builds from)

    for info in pkgutil.walk_packages(comfy.ldm.__path__, "comfy.ldm."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # a module that cannot import here cannot build a model here either
            continue
    roots = set()
    for family in FAMILIES.values():
        for path in family.classes:
            module, name = path.rsplit(".", 1)
            try:
                roots.add(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):  # listed for a newer ComfyUI than this host
                continue
    found, todo = set(roots), list(roots)
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found and sub.__module__.startswith("comfy."):
                found.add(sub)
                todo.append(sub)
    return found


def test_every_family_class_of_this_host_is_tested_or_refused():
    """A class a table lists has a tiny model in the suite (so every test above ran on it); any other subclass of a
    listed class is refused by name, never calibrated as its base (which left Wan Animate 2's attention inert)."""
    tested = _spec_classes()
    listed = {path for family in FAMILIES.values() for path in family.classes}
    for cls in _host_family_classes():
        path = f"{cls.__module__}.{cls.__qualname__}"
        if path in listed:
            assert path in tested, f"{path} is listed by a family table but no tiny model of it is tested"
        else:
            with pytest.raises(ValueError, match=rf"{re.escape(path)}\) is a variant of .* not verified"):
                detect(torch.nn.Module.__new__(cls))
