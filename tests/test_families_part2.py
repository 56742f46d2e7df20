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
from site_checks import family_setup
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
    return family_setup(request.param)


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


@pytest.mark.parametrize("spec, block, replace_key", [("joyimage", "double_blocks.1", ("double_block", 1))])
def test_zero_gates_equal_comfyui_block_skip(spec, block, replace_key):
    """A family that declares ``dit_blocks`` (calibri_core.slg turns a skipped block into its gates at 0): all gates
    of a block at 0 equal ComfyUI's own patches_replace['dit'] skip of that block."""
    from site_checks import ATOL, SIGMA
    from test_engine import _skip_block, _zero_block_calibration

    from calibri_core.host import apply_calibration

    patcher = tm.build_patcher(spec)
    _, layout = model_layout(patcher)
    x, positive = tm.latent(spec), tm.conditioning(spec)
    skipped = patcher.clone()
    skipped.set_model_patch_replace(_skip_block, "dit", *replace_key)
    expected = tm.predict(skipped, x, SIGMA, positive)
    ours = tm.predict(apply_calibration(patcher, _zero_block_calibration(layout, block)), x, SIGMA, positive)
    assert (ours - tm.predict(patcher, x, SIGMA, positive)).abs().max() > 1e-4, "the skip must change the output"
    assert (ours - expected).abs().max() <= ATOL
