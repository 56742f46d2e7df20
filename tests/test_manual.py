"""calibri_core.manual: the `site = value` grammar of CalibriManual, and combining calibrations. Pure, no ComfyUI."""

import pytest

from calibri_core.calibration import Calibration, Member
from calibri_core.families import get_family
from calibri_core.manual import parse_manual, parse_statements
from calibri_core.preset import Preset, combine_presets

FLUX = get_family("flux").layout({"double_blocks": 19, "single_blocks": 38})
SD3 = get_family("sd3").layout({"joint_blocks": 3, "dual_attention_blocks": [0], "context_pre_only_blocks": [2],
                                 "scale_mod_only": False})


def scales(cal: Calibration, member: int = 0) -> dict:
    return {k: v for k, v in cal.scales_by_site(member).items() if v != 1.0}


def test_empty_text_is_identity():
    cal = parse_manual("  \n# only a comment\n", FLUX, "block")
    assert cal == Calibration.identity(FLUX, "block")
    assert len(cal.sites) == 57


def test_block_values_ranges_comments_and_weight():
    cal = parse_manual("""
        # the paper's motivation experiment: bypass one block
        single_blocks.10 = 0
        single_blocks.20-22 = 1.5   # inclusive range
        double_blocks.3 = -0.25
        weight = 1.3
    """, FLUX, "block")
    assert scales(cal) == {"single_blocks.10": 0.0, "single_blocks.20": 1.5, "single_blocks.21": 1.5,
                           "single_blocks.22": 1.5, "double_blocks.3": -0.25}
    assert cal.members[0].weight == 1.3 and cal.members[0].prompt == "positive"
    assert (cal.family, cal.granularity) == ("flux", "block")


def test_range_with_suffix_and_coarser_names_at_gate_granularity():
    cal = parse_manual("double_blocks.3-4.img.attn = 1.2\ndouble_blocks.7 = 0\nsingle_blocks.0 = 2", FLUX, "gate")
    assert scales(cal) == {"double_blocks.3.img.attn": 1.2, "double_blocks.4.img.attn": 1.2,
                           "double_blocks.7.img.attn": 0.0, "double_blocks.7.img.mlp": 0.0,
                           "double_blocks.7.txt.attn": 0.0, "double_blocks.7.txt.mlp": 0.0,
                           "single_blocks.0": 2.0}
    layer = parse_manual("double_blocks.0-1.mlp = 0.5", FLUX, "layer")
    assert scales(layer) == {"double_blocks.0.mlp": 0.5, "double_blocks.1.mlp": 0.5}


def test_block_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match=r"line 2 .*single_blocks\.40 does not exist; this model has "
                                         r"single_blocks\.0-37"):
        parse_manual("single_blocks.1 = 0\nsingle_blocks.40 = 0", FLUX, "block")
    with pytest.raises(ValueError, match=r"single_blocks\.38 does not exist.*single_blocks\.0-37"):
        parse_manual("single_blocks.30-40 = 0", FLUX, "block")


def test_unknown_container_suggests_near_miss():
    with pytest.raises(ValueError, match=r"single_block\.3 does not exist.*Did you mean single_blocks"):
        parse_manual("single_block.3 = 0", FLUX, "block")


def test_name_finer_than_granularity_or_misspelt_branch():
    with pytest.raises(ValueError, match=r"double_blocks\.3\.img\.attn is not a block site.*granularity layer or "
                                         r"gate"):
        parse_manual("double_blocks.3.img.attn = 1.2", FLUX, "block")
    with pytest.raises(ValueError, match=r"double_blocks\.3\.atn is not a layer site.*Did you mean "
                                         r"double_blocks\.3\.attn"):
        parse_manual("double_blocks.3.atn = 1.2", FLUX, "layer")


def test_range_over_blocks_that_lack_a_site_is_an_error():
    # SD3: only dual-attention block 0 has attn2
    assert scales(parse_manual("joint_blocks.0.attn2 = 0", SD3, "layer")) == {"joint_blocks.0.attn2": 0.0}
    with pytest.raises(ValueError, match=r"joint_blocks\.1\.attn2 is not a layer site.*joint_blocks\.1 has "
                                         r"joint_blocks\.1\.attn, joint_blocks\.1\.mlp"):
        parse_manual("joint_blocks.0-1.attn2 = 0", SD3, "layer")


@pytest.mark.parametrize("text, pattern", [
    ("single_blocks.10 0", r"line 1 \('single_blocks.10 0'\) is not of the form `site = value`"),
    ("a = b = 1", r"not of the form"),
    ("single_blocks.10 = zero", r"'zero' is not a number"),
    ("single_blocks.10 =", r"'' is not a number"),
    ("\n\nsingle_blocks = 1", r"line 3 .*'single_blocks' is not a site name"),
    ("single_blocks.x = 1", r"is not a site name"),
    ("single_blocks.5-2 = 1", r"range 5-2 is reversed"),
    ("single_blocks.1 = nan", r"finite number, not nan"),
    ("single_blocks.1 = -inf", r"finite number, not -inf"),
    ("weight = inf", r"finite number"),
    ("weight = 1\nweight = 2", r"line 2 .*sets the weight ω again.*line 1"),
])
def test_syntax_errors_quote_line_and_number(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_statements(text)
    with pytest.raises(ValueError, match=pattern):
        parse_manual(text, FLUX, "block")


@pytest.mark.parametrize("text", [
    "single_blocks.3 = 0\nsingle_blocks.3 = 1",
    "single_blocks.0-5 = 0\nsingle_blocks.5-7 = 1",
])
def test_duplicates_name_both_lines(text):
    with pytest.raises(ValueError, match=r"line 2 .*sets single_blocks\.[35] again; line 1 .* already set it"):
        parse_manual(text, FLUX, "block")


def test_block_and_one_of_its_gates_is_a_duplicate():
    with pytest.raises(ValueError, match=r"sets double_blocks\.2\.img\.attn again"):
        parse_manual("double_blocks.2 = 0\ndouble_blocks.2.img.attn = 1", FLUX, "gate")


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity 'blocks'"):
        parse_manual("", FLUX, "blocks")


def _preset(cal: Calibration, layout=FLUX) -> Preset:
    return Preset(cal, layout.counts, {"source": "test"})


def test_combine_single_members_take_weight_and_prompt():
    a = parse_manual("single_blocks.1 = 0\nweight = 2", FLUX, "block")
    b = parse_manual("single_blocks.2 = 0", FLUX, "block")
    out = combine_presets([(_preset(a), 3.0, "positive"), (_preset(b), -2.0, "negative")])
    assert [(m.weight, m.prompt) for m in out.calibration.members] == [(6.0, "positive"), (-2.0, "negative")]
    assert out.calibration.members[0].scales == a.members[0].scales
    assert out.counts == FLUX.counts and out.provenance["source"] == "CalibriCombine"
    assert out.provenance["combined"][0]["provenance"] == {"source": "test"}


def test_combine_keeps_ensemble_members_and_scales_their_weights():
    sites = FLUX.site_names("block")
    ensemble = Calibration("flux", "block", sites, (Member((1.0,) * 57, 4.0, "positive"),
                                                    Member((0.5,) * 57, -3.0, "negative")))
    single = parse_manual("", FLUX, "block")
    out = combine_presets([(_preset(ensemble), 0.5, "positive"), (_preset(single), 1.0, "negative")])
    assert [(m.weight, m.prompt) for m in out.calibration.members] == [(2.0, "positive"), (-1.5, "negative"),
                                                                       (1.0, "negative")]


def test_combine_refuses_mismatches():
    block = _preset(parse_manual("", FLUX, "block"))
    gate = _preset(parse_manual("", FLUX, "gate"))
    small = get_family("flux").layout({"double_blocks": 2, "single_blocks": 2})
    other = _preset(parse_manual("", small, "block"), small)
    with pytest.raises(ValueError, match="input 2 has gate granularity .* input 1 has block"):
        combine_presets([(block, 1.0, "positive"), (gate, 1.0, "negative")])
    with pytest.raises(ValueError, match=r"input 2 was made for flux \(double_blocks=2, single_blocks=2\) but input 1 "
                                         r"for flux \(double_blocks=19"):
        combine_presets([(block, 1.0, "positive"), (other, 1.0, "negative")])
    with pytest.raises(ValueError, match="nothing to combine"):
        combine_presets([])
    with pytest.raises(ValueError, match="prompt 'both'"):
        combine_presets([(block, 1.0, "both")])
