"""Ensembles F = Σ ω_i f_{s_i}(x, t, p_i) through ComfyUI's samplers, and SLG re-expressed as an ensemble."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from site_checks import family_setup

from calibri_core import Calibration, Member
from calibri_core.ensemble import combine_x0, token_norm
from calibri_core.host import ActiveRange, apply_calibration, model_layout
from calibri_core.preset import load_preset
from calibri_core.slg import SHIPPED, skip_layer_calibration

SIGMA = 0.7
ATOL = 1e-5


def _scales(n, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple((0.5 + torch.rand(n, generator=g, dtype=torch.float64)).tolist())


def _one(layout, scales, weight=1.0, prompt="positive"):
    return Member(scales, weight, prompt)


def _calibration(layout, *members):
    return Calibration(layout.family, "gate", layout.site_names("gate"), members)


def _member_x0(patcher, layout, member, x, positive, negative):
    """One member alone: its calibration applied with ω = 1, on the prompt it sees."""
    single = _calibration(layout, Member(member.scales))
    cond = positive if member.prompt == "positive" else negative
    return tm.predict(apply_calibration(patcher, single), x, SIGMA, cond)


def _expected(patcher, layout, members, x, positive, negative):
    x_in = SIGMA * x  # the model input in tm.predict
    out = x_in.clone()
    for m in members:
        out += m.weight * (_member_x0(patcher, layout, m, x, positive, negative) - x_in)
    return out


@pytest.fixture(scope="module", params=["flux", "sd3", "qwen_image", "qwen_edit_index", "qwen_edit_2511", "wan"])
def setup(request):
    return family_setup(request.param)


def test_guider_equals_weighted_sum_of_members(setup):
    from calibri_core.sampling import EnsembleGuider

    family, patcher, layout = setup
    n = len(layout.gates)
    members = (_one(layout, _scales(n, 1), 3.0, "positive"), _one(layout, _scales(n, 2), -2.0, "negative"),
               _one(layout, _scales(n, 3), 0.5, "positive"))
    x, positive, negative = tm.latent(family), tm.conditioning(family, seed=1), tm.conditioning(family, seed=9)
    expected = _expected(patcher, layout, members, x, positive, negative)
    for low_vram in (False, True):
        guider = EnsembleGuider(patcher, _calibration(layout, *members), low_vram=low_vram)
        ours = tm.predict(None, x, SIGMA, positive, negative, guider=guider)
        assert (ours - expected).abs().max() <= ATOL, f"low_vram={low_vram}"


def test_guider_batches_members_into_one_forward(setup):
    from calibri_core.sampling import EnsembleGuider

    family, patcher, layout = setup
    n = len(layout.gates)
    calibration = _calibration(layout, _one(layout, _scales(n, 1), 2.0), _one(layout, _scales(n, 2), -1.0, "negative"))
    batches = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        tm.predict(None, tm.latent(family), SIGMA, tm.conditioning(family), tm.conditioning(family, seed=9),
                   guider=EnsembleGuider(patcher, calibration))
        batched = list(batches)
        batches.clear()
        tm.predict(None, tm.latent(family), SIGMA, tm.conditioning(family), tm.conditioning(family, seed=9),
                   guider=EnsembleGuider(patcher, calibration, low_vram=True))
    finally:
        handle.remove()
    assert batched == [2] and batches == [1, 1]


def test_ksampler_ensemble_replaces_cond_and_uncond_passes(setup):
    from calibri_core.sampling import apply_ensemble

    family, patcher, layout = setup
    n = len(layout.gates)
    pos = (_one(layout, _scales(n, 4), 1.5), _one(layout, _scales(n, 5), -0.5))
    neg = (_one(layout, _scales(n, 6), 1.0, "negative"),)
    x, positive, negative = tm.latent(family), tm.conditioning(family, seed=1), tm.conditioning(family, seed=9)
    cond = _expected(patcher, layout, pos, x, positive, negative)
    uncond = _expected(patcher, layout, neg, x, positive, negative)
    model = apply_ensemble(patcher, _calibration(layout, *pos, *neg))
    ours = tm.predict(model, x, SIGMA, positive, negative, cfg=2.5)
    assert (ours - (uncond + 2.5 * (cond - uncond))).abs().max() <= 1e-4
    # cfg 1 (Flux): F = Σ ω_i f_i over the positive members, uncond not computed
    only_pos = apply_ensemble(patcher, _calibration(layout, *pos))
    assert (tm.predict(only_pos, x, SIGMA, positive, negative, cfg=1.0) - cond).abs().max() <= ATOL
    # a pass with no members runs uncalibrated
    plain_uncond = tm.predict(patcher, x, SIGMA, negative)
    ours = tm.predict(only_pos, x, SIGMA, positive, negative, cfg=2.5)
    assert (ours - (plain_uncond + 2.5 * (cond - plain_uncond))).abs().max() <= 1e-4


def test_outside_the_range_members_run_uncalibrated_and_merge():
    from calibri_core.sampling import EnsembleGuider

    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    slg = skip_layer_calibration(layout, double_layers=(1,), single_layers=(0,), scale=3.0, cfg=2.0)
    slg = slg.convert("gate", layout)
    x, positive, negative = tm.latent("flux"), tm.conditioning("flux"), tm.conditioning("flux", seed=9)
    calls = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        guider = EnsembleGuider(patcher, slg, ActiveRange(0.6, 1.0))
        early = tm.predict(None, x, 0.95, positive, negative, guider=guider)
    finally:
        handle.remove()
    assert calls == [2], "outside the range the skip member merges into the identity member: 2 passes, not 3"
    plain_cfg = tm.predict(patcher, x, 0.95, positive, negative, cfg=2.0)
    assert (early - plain_cfg).abs().max() <= ATOL


def test_rescale_matches_positive_member_norm():
    from calibri_core.sampling import EnsembleGuider

    patcher = tm.build_patcher("qwen_image")
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    members = (_one(layout, _scales(n, 7), 4.0), _one(layout, _scales(n, 8), -3.0, "negative"))
    x, positive, negative = tm.latent("qwen_image"), tm.conditioning("qwen_image"), tm.conditioning("qwen_image", 9)
    guider = EnsembleGuider(patcher, _calibration(layout, *members), rescale=True)
    ours = tm.predict(None, x, SIGMA, positive, negative, guider=guider)
    x_in = SIGMA * x
    v_positive = (x_in - _member_x0(patcher, layout, members[0], x, positive, negative)) / SIGMA
    v_unscaled = (x_in - _expected(patcher, layout, members, x, positive, negative)) / SIGMA
    v_ours = (x_in - ours) / SIGMA
    assert (token_norm(v_ours, 2) - token_norm(v_positive, 2)).abs().max() <= 1e-4
    cosine = torch.nn.functional.cosine_similarity(v_ours.flatten(), v_unscaled.flatten(), dim=0)
    assert cosine > 0.99 and (v_ours - v_unscaled).abs().max() > 1e-3


def test_guider_rejects_bad_calibrations_before_sampling():
    from calibri_core.sampling import EnsembleGuider, apply_ensemble

    patcher = tm.build_patcher("flux")
    sd3_layout = model_layout(tm.build_patcher("sd3"))[1]
    with pytest.raises(ValueError, match="made for the sd3 family"):
        EnsembleGuider(patcher, Calibration.identity(sd3_layout))
    with pytest.raises(ValueError, match="made for the sd3 family"):
        apply_ensemble(patcher, Calibration.identity(sd3_layout))
    _, layout = model_layout(patcher)
    negative_only = Calibration("flux", "block", layout.site_names("block"),
                                (Member((1.0,) * len(layout.site_names("block")), 1.0, "negative"),))
    with pytest.raises(ValueError, match="rescale needs a member on the positive prompt"):
        EnsembleGuider(patcher, negative_only, rescale=True)


def test_combine_x0_packed_rows_equal_row_for_row():
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    row_for_row = combine_x0(x, [a, b], [2.0, -1.0])
    assert torch.allclose(row_for_row, x + 2.0 * (a - x) - (b - x), atol=1e-6)
    # the evaluator's layout: one forward of interleaved (pair, pass) rows, each adding into its pair
    packed = combine_x0(x, [torch.stack([a[0], b[0], a[1], b[1], a[2], b[2]])], [torch.tensor([2.0, -1.0] * 3)],
                        [torch.tensor([0, 0, 1, 1, 2, 2])])
    assert torch.equal(packed, row_for_row)
    # a row whose only pass has ω exactly 1 gets that x0 bit for bit
    lone = combine_x0(x, [a[:2], b[2:]], [torch.tensor([1.0, 2.0]), 1.0], [torch.tensor([0, 1]), torch.tensor([2])])
    assert torch.equal(lone[0], a[0]) and torch.equal(lone[2], b[2])
    assert torch.allclose(lone[1], x[1] + 2.0 * (a[1] - x[1]), atol=1e-6)


# --- Skip Layer Guidance: our ensemble with the SLG calibration == ComfyUI's SkipLayerGuidanceDiT -----------------

SLG_CASES = {  # family → tiny-model overrides deep enough for layers 7, 8, 9, and the shipped setting
    "flux": (dict(depth=10, depth_single_blocks=10), SHIPPED[2]),
    "sd3": (dict(depth=10, context_embedder_config={"target": "torch.nn.Linear",  # hidden = 64·depth
                                                    "params": {"in_features": 48, "out_features": 640}}),
            SHIPPED[0]),
}


@pytest.mark.parametrize("family", sorted(SLG_CASES))
def test_shipped_slg_presets_equal_comfyui_skip_layer_guidance(family, tmp_path):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    from calibri_core.sampling import EnsembleGuider, apply_ensemble

    overrides, shipped = SLG_CASES[family]
    for preset_file in [s for s in SHIPPED if s.family == family]:
        preset = load_preset(f"presets/{preset_file.filename}")
        assert preset.calibration == preset_file.calibration(), "the shipped file is what the generator makes"
    patcher = tm.build_patcher(family, **overrides)
    _, layout = model_layout(patcher)
    cfg = 2.0 if family == "flux" else shipped.cfg  # flux: also prove the cfg ≠ 1 algebra on a tiny model
    window = ActiveRange(shipped.start_percent, shipped.end_percent)
    steps = 10

    builtin = SkipLayerGuidanceDiT.execute(
        patcher, scale=shipped.scale, start_percent=shipped.start_percent, end_percent=shipped.end_percent,
        double_layers=",".join(map(str, shipped.double_layers)),
        single_layers=",".join(map(str, shipped.single_layers))).result[0]
    expected = tm.sample(builtin, family, seed=5, steps=steps, cfg=cfg)
    plain = tm.sample(patcher, family, seed=5, steps=steps, cfg=cfg)
    assert (expected - plain).abs().max() > 1e-3, "SLG must act inside its window"

    def calibration(form):
        return skip_layer_calibration(layout, double_layers=shipped.double_layers,
                                      single_layers=shipped.single_layers, scale=shipped.scale, cfg=cfg, form=form)

    via_ksampler = tm.sample(apply_ensemble(patcher, calibration("ksampler"), window), family, seed=5, steps=steps,
                             cfg=cfg)
    via_guider = tm.sample_with_guider(EnsembleGuider(patcher, calibration("guider"), window), family, seed=5,
                                       steps=steps)
    assert (via_ksampler - expected).abs().max() <= 1e-4
    assert (via_guider - expected).abs().max() <= 1e-4
