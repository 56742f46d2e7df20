"""Issue 11 (part 2): the ensemble tests of tests/test_ensemble.py on the new families' tiny models.

test_engine.py and test_no_inert_site.py already run on every spec in tiny_models.SPECS (the part-2 specs included);
test_ensemble.py fixes its family list, so its guider and KSampler ensemble tests are collected here again with this
module's ``setup`` fixture. Specs whose class a host lacks skip with the reason.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
from test_ensemble import (  # noqa: F401  (collected here with this module's setup)
    test_guider_batches_members_into_one_forward,
    test_guider_equals_weighted_sum_of_members,
    test_ksampler_ensemble_replaces_cond_and_uncond_passes,
)
from tiny_specs_part2 import SPECS_PART2

from calibri_core.host import model_layout


@pytest.fixture(scope="module", params=sorted(SPECS_PART2))
def setup(request):
    family = request.param
    patcher = tm.build_patcher(family)
    _, layout = model_layout(patcher)
    return family, patcher, layout
