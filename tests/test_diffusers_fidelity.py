"""Fidelity to the paper's semantics: our engine on ComfyUI models vs the reference's scaling on diffusers.

The same random weights live in a tiny diffusers transformer and in the ComfyUI model (loaded
through ComfyUI's own diffusers converters). The diffusers side is scaled by hooks written from
../shared/reference/calibri-reference.md (tests/diffusers_reference.py); the ComfyUI side by
``calibri_core.host.apply_calibration`` and run through ComfyUI's real sampler path. Both raw
velocity outputs must agree to 1e-5 in fp32.
"""

from __future__ import annotations

import diffusers_reference as ref
import pytest
import torch

from calibri_core.calibration import Calibration, Member
from calibri_core.host import apply_calibration, model_layout

TOLERANCE = 1e-5
CASES = [("flux", "block"), ("flux", "layer"), ("flux", "gate"), ("sd3", "gate"), ("qwen_image", "gate")]
_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _CACHE.clear()  # free the patchers while ComfyUI is still importable (ModelPatcher.__del__ needs it)


def _pair(family: str):
    """(diffusers model, ComfyUI patcher with the same weights, inputs), built once per family."""
    if family not in _CACHE:
        model = ref.build_diffusers(family, seed=0)
        _CACHE[family] = (model, ref.comfy_patcher_like(model, family), ref.make_inputs(family))
    return _CACHE[family]


def _random_calibration(family: str, granularity: str, sites: tuple[str, ...], seed: int) -> Calibration:
    generator = torch.Generator().manual_seed(seed)
    # Distinct per site, in [0.5, 1.5]: a permutation of evenly spaced values, so no two sites share a scale.
    values = torch.linspace(0.5, 1.5, len(sites) + 2)[1:-1][torch.randperm(len(sites), generator=generator)]
    return Calibration(family, granularity, sites, (Member(tuple(values.tolist())),))


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image"])
def test_identity_matches_diffusers(family):
    model, patcher, inputs = _pair(family)
    expected = ref.diffusers_velocity(model, family, inputs)
    _, layout = model_layout(patcher)
    calibrated = apply_calibration(patcher, Calibration.identity(layout, "gate"))
    for candidate in (patcher, calibrated):
        got = ref.comfy_velocity(candidate, family, inputs)
        difference = (got - expected).abs().max().item()
        print(f"{family} identity: max |Δv| = {difference:.3e}")
        assert difference <= TOLERANCE


@pytest.mark.parametrize("family,granularity", CASES)
def test_reference_sites_are_our_sites(family, granularity):
    """Same site names as the reference table gives (order is ours: model order; flat-vector order is layouts.py)."""
    model, patcher, _ = _pair(family)
    _, layout = model_layout(patcher)
    ours = layout.site_names(granularity)
    assert sorted(ref.reference_sites(model, family, granularity)) == sorted(ours)
    assert len(set(ours)) == len(ours)


@pytest.mark.parametrize("family,granularity", CASES)
def test_calibration_matches_reference(family, granularity):
    model, patcher, inputs = _pair(family)
    _, layout = model_layout(patcher)
    sites = layout.site_names(granularity)
    assert set(sites) == set(ref.reference_sites(model, family, granularity))
    calibration = _random_calibration(family, granularity, sites, seed=len(sites))

    with ref.reference_scaling(model, family, granularity, calibration.scales_by_site()):
        expected = ref.diffusers_velocity(model, family, inputs)
    unscaled = ref.diffusers_velocity(model, family, inputs)
    got = ref.comfy_velocity(apply_calibration(patcher, calibration), family, inputs)

    difference = (got - expected).abs().max().item()
    effect = (expected - unscaled).abs().max().item()
    print(f"{family} {granularity}: max |Δv| = {difference:.3e} (scaling moved v by {effect:.3e})")
    assert effect > 1e-2, "the scales should change the output far beyond the tolerance"
    assert difference <= TOLERANCE
    # The hooks were removed with the context, and the engine left the input patcher untouched.
    assert torch.equal(ref.diffusers_velocity(model, family, inputs), unscaled)
    assert (ref.comfy_velocity(patcher, family, inputs) - unscaled).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("family,granularity", [("flux", "block"), ("sd3", "gate"), ("qwen_image", "gate")])
def test_each_site_alone_matches_reference(family, granularity):
    """One site at a time at 0 (a skipped branch, as in SLG) and the rest at 1: catches a swapped pair of sites
    that a single all-sites comparison could hide only by coincidence, and exercises scale 0."""
    model, patcher, inputs = _pair(family)
    _, layout = model_layout(patcher)
    sites = layout.site_names(granularity)
    first, last = sites[0].split(".")[:2], sites[-1].split(".")[:2]
    # Past 8 sites, the first and the last block only (for SD3: a dual-attention and the context_pre_only block).
    probed = [s for s in sites if len(sites) <= 8 or s.split(".")[:2] in (first, last)]
    worst = 0.0
    for site in probed:
        scales = tuple(0.0 if s == site else 1.0 for s in sites)
        calibration = Calibration(family, granularity, sites, (Member(scales),))
        with ref.reference_scaling(model, family, granularity, calibration.scales_by_site()):
            expected = ref.diffusers_velocity(model, family, inputs)
        got = ref.comfy_velocity(apply_calibration(patcher, calibration), family, inputs)
        worst = max(worst, (got - expected).abs().max().item())
    print(f"{family} {granularity} one site at 0: worst max |Δv| = {worst:.3e} over {len(probed)} sites")
    assert worst <= TOLERANCE


def test_strength_matches_reference_at_interpolated_scales():
    """apply_calibration(strength=k) is the reference run with scales 1 + k·(s − 1)."""
    family, granularity, strength = "flux", "gate", 0.5
    model, patcher, inputs = _pair(family)
    _, layout = model_layout(patcher)
    sites = layout.site_names(granularity)
    calibration = _random_calibration(family, granularity, sites, seed=7)
    interpolated = {site: 1 + strength * (s - 1) for site, s in calibration.scales_by_site().items()}
    with ref.reference_scaling(model, family, granularity, interpolated):
        expected = ref.diffusers_velocity(model, family, inputs)
    got = ref.comfy_velocity(apply_calibration(patcher, calibration, strength=strength), family, inputs)
    difference = (got - expected).abs().max().item()
    print(f"{family} {granularity} strength {strength}: max |Δv| = {difference:.3e}")
    assert difference <= TOLERANCE
