"""Pure calibration data: granularity conversions and layouts (no ComfyUI)."""

import pytest

from calibri_core import Calibration, Member
from calibri_core.families import get_family

FLUX = get_family("flux").layout({"double_blocks": 2, "single_blocks": 3})


def test_paper_counts_for_flux_dev():
    layout = get_family("flux").layout({"double_blocks": 19, "single_blocks": 38})
    assert [len(layout.site_names(g)) for g in ("block", "layer", "gate")] == [57, 76, 114]


def test_site_names_are_readable():
    assert FLUX.site_names("gate")[:4] == ("double_blocks.0.img.attn", "double_blocks.0.img.mlp",
                                           "double_blocks.0.txt.attn", "double_blocks.0.txt.mlp")
    assert FLUX.site_names("layer")[:2] == ("double_blocks.0.attn", "double_blocks.0.mlp")
    assert FLUX.site_names("block")[-1] == "single_blocks.2"


def test_sd3_sites_follow_dual_attention_and_pre_only():
    layout = get_family("sd3").layout({"joint_blocks": 3, "dual_attention_blocks": [0],
                                       "context_pre_only_blocks": [2], "scale_mod_only": False})
    names = layout.site_names("gate")
    assert "joint_blocks.0.x.attn2" in names and "joint_blocks.1.x.attn2" not in names
    assert "joint_blocks.2.context.attn" not in names and "joint_blocks.2.x.mlp" in names


def test_block_expands_to_layer_and_gate():
    block_sites = FLUX.site_names("block")
    calibration = Calibration("flux", "block", block_sites,
                              (Member(tuple(float(i) for i in range(len(block_sites))), weight=0.5),))
    gate = calibration.convert("gate", FLUX)
    assert gate.scales_by_site()["double_blocks.1.txt.mlp"] == 1.0
    assert gate.members[0].weight == 0.5
    assert calibration.convert("layer", FLUX).scales_by_site()["double_blocks.1.attn"] == 1.0
    assert gate.convert("block", FLUX) == calibration


def test_merge_of_different_values_is_refused():
    sites = FLUX.site_names("gate")
    scales = [1.0] * len(sites)
    scales[sites.index("double_blocks.0.txt.attn")] = 2.0
    calibration = Calibration("flux", "gate", sites, (Member(tuple(scales)),))
    with pytest.raises(ValueError, match="double_blocks.0.attn"):
        calibration.convert("layer", FLUX)


def test_members_and_prompts_validated():
    sites = FLUX.site_names("block")
    with pytest.raises(ValueError, match="prompt"):
        Calibration("flux", "block", sites, (Member((1.0,) * len(sites), prompt="neutral"),))
    with pytest.raises(ValueError, match="granularity"):
        Calibration("flux", "blocks", sites, (Member((1.0,) * len(sites)),))
    with pytest.raises(ValueError, match="unique"):
        Calibration("flux", "block", (sites[0], sites[0]), (Member((1.0, 1.0)),))
