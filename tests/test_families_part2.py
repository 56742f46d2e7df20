"""Issue 11 (part 2): the ensemble tests of tests/test_ensemble.py on the new families' tiny models.

test_engine.py and test_no_inert_site.py already run on every spec in tiny_models.SPECS (the part-2 specs included);
test_ensemble.py fixes its family list, so its guider and KSampler ensemble tests are collected here again with this
module's ``setup`` fixture. Specs whose class a host lacks skip with the reason. Also: the models refused by name
(calibri_core/families/refused.py) are refused with their reason.
"""

from __future__ import annotations

import re

import pytest
import tiny_models as tm
import torch
from test_ensemble import (  # noqa: F401  (collected here with this module's setup)
    test_guider_batches_members_into_one_forward,
    test_guider_equals_weighted_sum_of_members,
    test_ksampler_ensemble_replaces_cond_and_uncond_passes,
)
from tiny_specs_part2 import SPECS_PART2

from calibri_core.families import detect
from calibri_core.families.refused import REASONS
from calibri_core.host import model_layout


@pytest.fixture(scope="module", params=sorted(SPECS_PART2))
def setup(request):
    family = request.param
    patcher = tm.build_patcher(family)
    _, layout = model_layout(patcher)
    return family, patcher, layout


@pytest.mark.parametrize("path", sorted(REASONS))
def test_refused_models_are_refused_by_name_with_the_reason(path):
    """Mochi (tanh gates inside a functional RMSNorm: no module output scales them exactly) and the ungated models
    are refused with their reason, before any forward, on the host that has the class."""
    import importlib

    module, name = path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {path}")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}\) cannot be calibrated: {re.escape(REASONS[path][:40])}"):
        detect(torch.nn.Module.__new__(cls))
