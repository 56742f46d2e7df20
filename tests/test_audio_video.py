"""Issue 11 (part 2): audio-video families on tiny models with (video, audio) NestedTensor latents.

The invariants of tests/test_engine.py, test_no_inert_site.py and test_ensemble.py, checked through ComfyUI's real
sampling path (the guider packs the nested latent and the model unpacks it): identity is bit-identical; every site
at every granularity moves the prediction and equals its independent reference (tests/engine_reference_part2.py);
all gates at once equal it; batch rows carry their own calibrations; the input MODEL is untouched; a LoRA-style
weight patch composes; a full sampling run is deterministic; an ensemble through the guider is the weighted sum of
its members. Specs whose class a host lacks skip with the reason.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher
from site_checks import (
    ATOL,
    SIGMA,
    assert_identity_is_bit_identical,
    assert_rows_carry_their_calibrations,
    gate_calibration,
)
from tiny_specs_part2 import AUDIO_LATENTS, AV_SPECS_PART2

from calibri_core import Calibration, Member
from calibri_core.host import PATCH_KEY, apply_calibration, model_layout
from calibri_core.sites import GRANULARITIES

SCALE = 1.6
REPRODUCED = 0.01  # as tests/test_no_inert_site.py: a site must move the prediction and its reference must match
ROUNDING = 1e-6  # to 1 % of the move or to fp32 rounding (about 8 ulp of the prediction's scale)


def av_latent(spec_name: str, seed: int = 2, batch: int = 1):
    import comfy.nested_tensor

    generator = torch.Generator().manual_seed(seed)
    shapes = (tm.SPECS[spec_name].latent, AUDIO_LATENTS[spec_name])
    return comfy.nested_tensor.NestedTensor([torch.randn((batch,) + s, generator=generator) for s in shapes])


predict = tm.predict  # a nested latent is sampled packed: the x0 it returns is the packed (video | audio) one


def _random_scales(n: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (0.4 + 1.2 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist()


@pytest.fixture(scope="module", params=sorted(AV_SPECS_PART2))
def spec(request):
    return request.param


@pytest.fixture(scope="module")
def patcher(spec):
    return tm.build_patcher(spec)


@pytest.fixture(scope="module")
def inputs(spec, patcher):
    x, positive = av_latent(spec), tm.conditioning(spec)
    return x, positive, predict(patcher, x, SIGMA, positive)


def test_both_modalities_are_sites(spec, patcher):
    family, layout = model_layout(patcher)
    assert family.name == tm.family_of(spec)
    assert {"video", "audio"} <= {g.stream for g in layout.gates}


def test_identity_is_bit_identical(patcher, inputs):
    x, positive, base = inputs
    assert_identity_is_bit_identical(patcher, x, positive, base, predict=predict)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_site_moves_the_prediction_as_its_reference_does(spec, patcher, inputs, granularity):
    x, positive, base = inputs
    family, layout = model_layout(patcher)
    discarded = set(family.discarded(layout.counts)) if granularity == "gate" else set()
    sites, gate_site = layout.site_names(granularity), layout.gate_to_site(granularity)
    scale = float(base.abs().max())
    inert, wrong = [], []
    for index, site in enumerate(sites):
        calibration = Calibration(layout.family, granularity, sites,
                                  (Member(tuple(SCALE if i == index else 1.0 for i in range(len(sites)))),))
        ours = predict(apply_calibration(patcher, calibration), x, SIGMA, positive)
        gates = {g: SCALE for g, s in enumerate(gate_site) if s == index}
        expected = predict(reference_patcher(spec, gates), x, SIGMA, positive)
        moved, error = float((ours - base).abs().max()), float((ours - expected).abs().max())
        if moved == 0.0:
            inert.append(site)
        if not (error <= ATOL and error <= max(REPRODUCED * moved, ROUNDING * scale)) and site not in discarded:
            wrong.append(f"{site} (moved {moved:.2e}, |ours - reference| = {error:.2e})")
    assert sorted(inert) == sorted(discarded), f"{spec}: inert sites at {granularity}: {inert}; declared: {discarded}"
    assert not wrong, f"{spec}: sites unlike their reference at {granularity} granularity: {wrong}"


def test_all_gates_match_independent_reference(spec, patcher, inputs):
    x, positive, _ = inputs
    _, layout = model_layout(patcher)
    scales = _random_scales(len(layout.gates), seed=0)
    ours = predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    expected = predict(reference_patcher(spec, dict(enumerate(scales))), x, SIGMA, positive)
    assert (ours - expected).abs().max() <= ATOL


def test_rows_of_one_batch_carry_different_calibrations(spec, patcher):
    family, layout = model_layout(patcher)
    if family.single_sample_forward:
        pytest.skip(f"{family.title} runs one sample per forward (it refuses a batch of 2), so a forward has one row; "
                    "several calibrations are covered by the ensemble test")
    n = len(layout.gates)
    rows = torch.tensor([_random_scales(n, seed=1), _random_scales(n, seed=2)], dtype=torch.float32)
    assert_rows_carry_their_calibrations(patcher, rows, av_latent(spec, batch=2), tm.conditioning(spec),
                                         predict=predict)


def test_clone_isolation_and_lora_composition(spec, patcher, inputs):
    x, positive, base = inputs
    _, layout = model_layout(patcher)
    scales = _random_scales(len(layout.gates), seed=3)
    key = next(k for k, w in patcher.model.state_dict().items()  # LTX-2's audio FF, MiniMax's shared MLP
               if ".audio_ff." in k or (k.startswith("diffusion_model.blocks.") and ".mlp." in k) and w.ndim == 2)
    delta = torch.randn(patcher.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(5)) * 0.05
    lora = patcher.clone()
    lora.add_patches({key: (delta,)}, 1.0)
    calibrated = apply_calibration(lora, gate_calibration(layout, scales))
    assert PATCH_KEY in calibrated.wrappers.get("apply_model", {})
    assert PATCH_KEY not in patcher.wrappers.get("apply_model", {})
    ours = predict(calibrated, x, SIGMA, positive)
    reference = reference_patcher(spec, dict(enumerate(scales)))
    with torch.no_grad():
        reference.model.state_dict()[key].add_(delta)
    without_lora = predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    assert (ours - without_lora).abs().max() > 1e-5, "the LoRA-style patch on an FF must take effect"
    assert (ours - predict(reference, x, SIGMA, positive)).abs().max() <= ATOL
    assert torch.equal(predict(patcher, x, SIGMA, positive), base), "the input MODEL must be untouched"


def _sample(model, spec, seed=3, cfg=2.0):
    import comfy.sample

    empty = tm.stream_wise(av_latent(spec), torch.zeros_like)
    noise = comfy.sample.prepare_noise(empty, seed)
    return comfy.sample.sample(model, noise, 3, cfg, "euler", "simple", tm.conditioning(spec, seed=11),
                               tm.conditioning(spec, seed=12), empty, seed=seed, disable_pbar=True)


def test_full_sampling_run_differs_and_is_deterministic(spec, patcher):
    _, layout = model_layout(patcher)
    calibrated = apply_calibration(patcher, gate_calibration(layout, _random_scales(len(layout.gates), seed=6)))
    base, first, second = _sample(patcher, spec), _sample(calibrated, spec), _sample(calibrated, spec)
    assert all(torch.isfinite(t).all() for t in first.unbind())
    # MiniMax H3's tiny model moves least (8.8e-5): well above the 1e-7 rounding of its O(1) latents
    assert max(float((a - b).abs().max()) for a, b in zip(first.unbind(), base.unbind())) > 1e-5
    assert all(torch.equal(a, b) for a, b in zip(first.unbind(), second.unbind()))


def test_guider_equals_weighted_sum_of_members(spec, patcher):
    from calibri_core.sampling import EnsembleGuider

    _, layout = model_layout(patcher)
    n = len(layout.gates)
    # two members on one prompt: their passes can share a forward (one forward each for MiniMax H3)
    members = (Member(tuple(_random_scales(n, 1)), 3.0, "positive"), Member(tuple(_random_scales(n, 2)), -2.0,
                                                                            "negative"),
               Member(tuple(_random_scales(n, 3)), 0.5, "positive"))
    x, positive, negative = av_latent(spec), tm.conditioning(spec, seed=1), tm.conditioning(spec, seed=9)
    x_in = torch.cat([SIGMA * t.reshape(t.shape[0], 1, -1) for t in x.unbind()], dim=-1)  # the packed model input
    expected = x_in.clone()
    for m in members:
        alone = predict(apply_calibration(patcher, gate_calibration(layout, m.scales)), x, SIGMA,
                        positive if m.prompt == "positive" else negative)
        expected += m.weight * (alone - x_in)
    calibration = Calibration(layout.family, "gate", layout.site_names("gate"), members)
    for low_vram in (False, True):
        ours = predict(None, x, SIGMA, positive, negative, guider=EnsembleGuider(patcher, calibration,
                                                                                 low_vram=low_vram))
        assert (ours - expected).abs().max() <= ATOL, f"low_vram={low_vram}"


def test_ksampler_ensemble_equals_weighted_sum_of_members(spec, patcher):
    from calibri_core.sampling import apply_ensemble

    _, layout = model_layout(patcher)
    n = len(layout.gates)
    members = (Member(tuple(_random_scales(n, 4)), 1.5), Member(tuple(_random_scales(n, 5)), -0.5))
    x, positive = av_latent(spec), tm.conditioning(spec, seed=1)
    x_in = torch.cat([SIGMA * t.reshape(t.shape[0], 1, -1) for t in x.unbind()], dim=-1)
    expected = x_in.clone()
    for m in members:
        alone = predict(apply_calibration(patcher, gate_calibration(layout, m.scales)), x, SIGMA, positive)
        expected += m.weight * (alone - x_in)
    model = apply_ensemble(patcher, Calibration(layout.family, "gate", layout.site_names("gate"), members))
    ours = predict(model, x, SIGMA, positive, tm.conditioning(spec, seed=9), cfg=1.0)
    assert (ours - expected).abs().max() <= ATOL


def test_search_evaluator_refuses_audio_video_before_sampling(spec, patcher):
    from search.evaluator import Evaluator
    from search.models import HashTextEncoder, ModelBundle

    context = tm.SPECS[spec].context
    bundle = ModelBundle(patcher, HashTextEncoder(context[0], context[1]), name=f"tiny-{spec}")
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda *a: pytest.fail("a forward ran"))
    try:
        with pytest.raises(ValueError, match="denoises video and audio together"):
            Evaluator(bundle, None, steps=2, latent_shape=tm.SPECS[spec].latent)
    finally:
        handle.remove()
