"""The calibration engine on tiny random-weight ComfyUI models of every supported family."""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher
from site_checks import gate_calibration, record_forward

from calibri_core import Calibration, Member
from calibri_core.host import PATCH_KEY, ActiveRange, apply_calibration, apply_row_scales, model_layout

SIGMA = 0.7
ATOL = 1e-5


@pytest.fixture(scope="module", params=tm.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def patcher(family):
    return tm.build_patcher(family)


def random_scales(n: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (0.4 + 1.2 * torch.rand(n, generator=generator, dtype=torch.float64)).tolist()


def test_family_detected(family, patcher):
    detected, layout = model_layout(patcher)
    assert detected.name == tm.family_of(family)
    assert layout.gates


def test_identity_is_bit_identical(family, patcher):
    _, layout = model_layout(patcher)
    x, positive = tm.latent(family), tm.conditioning(family)
    base = tm.predict(patcher, x, SIGMA, positive)
    for granularity in ("block", "layer", "gate"):
        calibrated = apply_calibration(patcher, Calibration.identity(layout, granularity))
        assert torch.equal(tm.predict(calibrated, x, SIGMA, positive), base)


def test_one_site_matches_independent_reference(family, patcher):
    _, layout = model_layout(patcher)
    index = len(layout.gates) // 2
    scales = [1.0] * len(layout.gates)
    scales[index] = 1.7
    x, positive = tm.latent(family), tm.conditioning(family)
    ours = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    reference = tm.predict(reference_patcher(family, {index: 1.7}), x, SIGMA, positive)
    base = tm.predict(patcher, x, SIGMA, positive)
    assert (ours - base).abs().max() > 1e-4, "scaling one gate must change the prediction"
    assert (ours - reference).abs().max() <= ATOL


def test_every_gate_matches_independent_reference(family, patcher):
    _, layout = model_layout(patcher)
    scales = random_scales(len(layout.gates))
    x, positive = tm.latent(family), tm.conditioning(family)
    ours = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    reference = tm.predict(reference_patcher(family, dict(enumerate(scales))), x, SIGMA, positive)
    assert (ours - reference).abs().max() <= ATOL


def _skip_block(args, extra):
    return {key: args[key] for key in ("img", "txt") if key in args}


def _block_gates(layout, block):
    return [i for i, g in enumerate(layout.gates) if g.block == block]


def _zero_block_calibration(layout, block):
    scales = [1.0] * len(layout.gates)
    for i in _block_gates(layout, block):
        scales[i] = 0.0
    return gate_calibration(layout, scales)


DIT_BLOCKS = {  # family → (block site, ComfyUI 'dit' replace key) for ComfyUI's own block skip
    "flux": [("double_blocks.1", ("double_block", 1)), ("single_blocks.0", ("single_block", 0))],
    "longcat_image": [("double_blocks.0", ("double_block", 0)), ("single_blocks.1", ("single_block", 1))],
    "ovis_image": [("double_blocks.1", ("double_block", 1)), ("single_blocks.0", ("single_block", 0))],
    "flux2": [("double_blocks.0", ("double_block", 0)), ("single_blocks.1", ("single_block", 1))],
    "chroma": [("double_blocks.1", ("double_block", 1)), ("single_blocks.1", ("single_block", 1))],
    "sd3": [("joint_blocks.1", ("double_block", 1)), ("joint_blocks.3", ("double_block", 3))],
    "qwen_image": [("transformer_blocks.0", ("double_block", 0))],
}


@pytest.mark.parametrize("family_name", sorted(DIT_BLOCKS))
def test_zero_gates_equal_comfyui_block_skip(family_name):
    patcher = tm.build_patcher(family_name)
    _, layout = model_layout(patcher)
    x, positive = tm.latent(family_name), tm.conditioning(family_name)
    for block, replace_key in DIT_BLOCKS[family_name]:
        skipped = patcher.clone()
        skipped.set_model_patch_replace(_skip_block, "dit", *replace_key)
        expected = tm.predict(skipped, x, SIGMA, positive)
        ours = tm.predict(apply_calibration(patcher, _zero_block_calibration(layout, block)), x, SIGMA, positive)
        assert (ours - expected).abs().max() <= ATOL, block


def test_slg_is_refused_where_zero_gates_are_not_a_block_skip():
    """Wan's cross-attention adds to the residual ungated: zero gates leave it, ComfyUI's block skip does not."""
    from calibri_core.slg import skip_layer_calibration

    patcher = tm.build_patcher("wan")
    family, layout = model_layout(patcher)
    x, positive = tm.latent("wan"), tm.conditioning("wan")
    skipped = patcher.clone()
    skipped.set_model_patch_replace(_skip_block, "dit", "double_block", 1)
    expected = tm.predict(skipped, x, SIGMA, positive)
    ours = tm.predict(apply_calibration(patcher, _zero_block_calibration(layout, "blocks.1")), x, SIGMA, positive)
    assert (ours - expected).abs().max() > 100 * ATOL
    assert family.not_a_block_skip
    with pytest.raises(ValueError, match="cross-attention adds to the residual without a gate"):
        skip_layer_calibration(layout, double_layers=(1,), scale=3.0, cfg=6.0)



@pytest.mark.parametrize("family_name", ["lumina2", "z_image"])
def test_lumina_zero_gates_pass_through_and_context_refiner_untouched(family_name):
    patcher = tm.build_patcher(family_name)
    dm = patcher.model.diffusion_model
    _, layout = model_layout(patcher)
    x, positive = tm.latent(family_name), tm.conditioning(family_name)
    seen_base, seen_zero = {}, {}
    handles = [record_forward(dm.context_refiner[0], seen_base, "ctx")]
    tm.predict(patcher, x, SIGMA, positive)
    for h in handles:
        h.remove()
    handles = [record_forward(dm.layers[1], seen_zero, "layer"),
               record_forward(dm.context_refiner[0], seen_zero, "ctx")]
    everything_zero = gate_calibration(layout, [0.0] * len(layout.gates))
    tm.predict(apply_calibration(patcher, everything_zero), x, SIGMA, positive)
    for h in handles:
        h.remove()
    layer_args, layer_out = seen_zero["layer"]
    assert torch.equal(layer_out, layer_args[0]), "a block whose gates are all 0 must pass its input through"
    assert torch.equal(seen_zero["ctx"][1], seen_base["ctx"][1]), "the ungated context_refiner must be untouched"


def test_wan_zero_gates_leave_only_ungated_cross_attention():
    patcher = tm.build_patcher("wan")
    dm = patcher.model.diffusion_model
    _, layout = model_layout(patcher)
    x, positive = tm.latent("wan"), tm.conditioning("wan")
    seen = {}
    block = dm.blocks[1]
    handles = [block.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw.get("x", a[0] if a else None),
                                                                             kwargs=kw, out=out), with_kwargs=True),
               block.cross_attn.register_forward_hook(lambda m, a, out: seen.update(cross=out))]
    tm.predict(apply_calibration(patcher, _zero_block_calibration(layout, "blocks.1")), x, SIGMA, positive)
    for h in handles:
        h.remove()
    assert seen["cross"].abs().max() > 0, "cross-attention contributes"
    assert (seen["out"] - (seen["x"] + seen["cross"])).abs().max() <= ATOL


def test_rows_of_one_batch_carry_different_calibrations(family, patcher):
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    rows = torch.tensor([random_scales(n, seed=1), random_scales(n, seed=2)], dtype=torch.float32)
    x, positive = tm.latent(family, batch=2), tm.conditioning(family)
    both = tm.predict(apply_row_scales(patcher, lambda options, batch: rows), x, SIGMA, positive)
    for i in range(2):
        single = gate_calibration(layout, rows[i].tolist())
        alone = tm.predict(apply_calibration(patcher, single), x[i:i + 1], SIGMA, positive)
        assert (both[i:i + 1] - alone).abs().max() <= ATOL


def test_clone_isolation(family, patcher):
    _, layout = model_layout(patcher)
    x, positive = tm.latent(family), tm.conditioning(family)
    before = tm.predict(patcher, x, SIGMA, positive)
    patch_count = len(patcher.object_patches)
    calibrated = apply_calibration(patcher, gate_calibration(layout, random_scales(len(layout.gates))))
    assert PATCH_KEY in calibrated.wrappers.get("apply_model", {})
    assert PATCH_KEY not in patcher.wrappers.get("apply_model", {})
    assert len(patcher.object_patches) == patch_count
    tm.predict(calibrated, x, SIGMA, positive)
    assert torch.equal(tm.predict(patcher, x, SIGMA, positive), before)


def _lora_style_patch(patcher):
    """A 'diff' weight patch on the first MLP weight inside a block, as a LoRA loader would add."""
    key = next(k for k, w in patcher.model.state_dict().items() if k.startswith("diffusion_model.") and w.ndim == 2
               and k.endswith(".weight") and any(n in k for n in ("mlp", "ffn", "feed_forward", ".ff.", ".ff_")))
    weight = patcher.model.state_dict()[key]
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05
    return key, delta


def test_composes_with_lora_style_weight_patch(family, patcher):
    _, layout = model_layout(patcher)
    scales = random_scales(len(layout.gates), seed=3)
    key, delta = _lora_style_patch(patcher)
    lora = patcher.clone()
    lora.add_patches({key: (delta,)}, 1.0)
    x, positive = tm.latent(family), tm.conditioning(family)
    ours = tm.predict(apply_calibration(lora, gate_calibration(layout, scales)), x, SIGMA, positive)
    reference = reference_patcher(family, dict(enumerate(scales)))
    with torch.no_grad():
        reference.model.state_dict()[key].add_(delta)
    expected = tm.predict(reference, x, SIGMA, positive)
    without_lora = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    assert (ours - without_lora).abs().max() > 1e-4, "the LoRA-style patch must take effect"
    assert (ours - expected).abs().max() <= ATOL


SLG_LAYERS = {  # families whose blocks honour patches_replace['dit'] (comfyui.md B)
    "flux": ("1", "0"), "flux2": ("0", "1"), "chroma": ("1", "1"), "sd3": ("1", ""),
    "qwen_image": ("0", ""), "wan": ("1", ""),
}


@pytest.mark.parametrize("family_name", sorted(SLG_LAYERS))
def test_composes_with_skip_layer_guidance(family_name):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    patcher = tm.build_patcher(family_name)
    _, layout = model_layout(patcher)
    scales = random_scales(len(layout.gates), seed=4)
    double, single = SLG_LAYERS[family_name]

    def slg(model):
        return SkipLayerGuidanceDiT.execute(model, scale=2.0, start_percent=0.0, end_percent=1.0,
                                            double_layers=double, single_layers=single).result[0]

    x = tm.latent(family_name)
    positive, negative = tm.conditioning(family_name, seed=1), tm.conditioning(family_name, seed=7)
    ours = tm.predict(slg(apply_calibration(patcher, gate_calibration(layout, scales))), x, SIGMA, positive,
                      negative, cfg=2.5)
    expected = tm.predict(slg(reference_patcher(family_name, dict(enumerate(scales)))), x, SIGMA, positive, negative,
                          cfg=2.5)
    plain = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive, negative,
                       cfg=2.5)
    assert (ours - plain).abs().max() > 1e-4, "SLG must take effect on the calibrated model"
    assert (ours - expected).abs().max() <= ATOL


def test_full_sampling_run_differs_and_is_deterministic(family, patcher):
    _, layout = model_layout(patcher)
    calibrated = apply_calibration(patcher, gate_calibration(layout, random_scales(len(layout.gates), seed=6)))
    base = tm.sample(patcher, family, seed=3, cfg=2.0)
    first = tm.sample(calibrated, family, seed=3, cfg=2.0)
    second = tm.sample(calibrated, family, seed=3, cfg=2.0)
    assert torch.isfinite(first).all()
    assert (first - base).abs().max() > 1e-4
    assert torch.equal(first, second)


def test_strength_and_output_weight(patcher, family):
    _, layout = model_layout(patcher)
    scales = random_scales(len(layout.gates), seed=8)
    half = [1 + 0.5 * (s - 1) for s in scales]
    x, positive = tm.latent(family), tm.conditioning(family)
    at_half = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales), strength=0.5), x, SIGMA, positive)
    direct = tm.predict(apply_calibration(patcher, gate_calibration(layout, half)), x, SIGMA, positive)
    assert (at_half - direct).abs().max() <= ATOL
    off = apply_calibration(patcher, gate_calibration(layout, scales), strength=0.0)
    assert torch.equal(tm.predict(off, x, SIGMA, positive), tm.predict(patcher, x, SIGMA, positive))
    # ω multiplies the velocity: x0' = x − σ·ω·v
    weighted = Calibration(layout.family, "gate", layout.site_names("gate"), (Member(tuple(scales), weight=1.3),))
    plain = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive)
    with_weight = tm.predict(apply_calibration(patcher, weighted), x, SIGMA, positive)
    x_in = SIGMA * x  # what the model sees: flow noise scaling σ·noise + (1 − σ)·latent, latent = 0 in predict()
    velocity = (x_in - plain) / SIGMA
    assert (with_weight - (x_in - SIGMA * 1.3 * velocity)).abs().max() <= ATOL


def test_active_range_limits_the_calibration():
    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    calibration = gate_calibration(layout, random_scales(len(layout.gates), seed=9))
    x, positive = tm.latent("flux"), tm.conditioning("flux")
    late_only = apply_calibration(patcher, calibration, active_range=ActiveRange(0.5, 1.0))
    sampling = patcher.get_model_object("model_sampling")
    boundary = float(sampling.percent_to_sigma(0.5))
    early, late = min(0.999, boundary + 0.1), boundary - 0.1
    assert torch.equal(tm.predict(late_only, x, early, positive), tm.predict(patcher, x, early, positive))
    assert (tm.predict(late_only, x, late, positive) - tm.predict(patcher, x, late, positive)).abs().max() > 1e-4


class _NoForward:
    """Fails the test if anything runs the model before validation has finished."""

    def __init__(self, patcher):
        self.patcher = patcher

    def __enter__(self):
        dm = self.patcher.model.diffusion_model
        self.handle = dm.register_forward_pre_hook(lambda *a: pytest.fail("a forward ran before validation"))

    def __exit__(self, *exc):
        self.handle.remove()


def test_bad_input_is_rejected_before_any_forward():
    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    sites = layout.site_names("block")
    with _NoForward(patcher):
        with pytest.raises(ValueError, match="2 sites"):
            Calibration("flux", "block", sites[:2], (Member((1.0,) * 3),))
        wrong_count = Calibration("flux", "block", sites[:-1], (Member((1.0,) * (len(sites) - 1)),))
        with pytest.raises(ValueError, match="missing sites"):
            apply_calibration(patcher, wrong_count)
        unknown = Calibration("flux", "block", sites[:-1] + ("double_blocks.9",), (Member((1.0,) * len(sites)),))
        with pytest.raises(ValueError, match="unknown site 'double_blocks.9'"):
            apply_calibration(patcher, unknown)
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="non-finite"):
                Calibration("flux", "block", sites, (Member((bad,) + (1.0,) * (len(sites) - 1)),))
        with pytest.raises(ValueError, match="output weight"):
            Calibration("flux", "block", sites, (Member((1.0,) * len(sites), weight=math.nan),))
        other = Calibration("sd3", "block", sites, (Member((1.0,) * len(sites)),))
        with pytest.raises(ValueError, match="made for the sd3 family.*flux"):
            apply_calibration(patcher, other)
        with pytest.raises(ValueError, match="N = 0"):
            Calibration("flux", "block", sites, ())
        two = Calibration("flux", "block", sites, (Member((1.0,) * len(sites)),) * 2)
        with pytest.raises(ValueError, match="2 members"):
            apply_calibration(patcher, two)
        with pytest.raises(ValueError, match="start_percent"):
            ActiveRange(0.8, 0.2)


def test_unsupported_model_lists_families():
    import comfy.model_patcher

    class NotADiT(torch.nn.Module):
        pass

    holder = torch.nn.Module()
    holder.diffusion_model = NotADiT()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="Supported families: .*flux.*sd3.*wan"):
        model_layout(comfy.model_patcher.ModelPatcher(holder, cpu, cpu))


def test_wan22_per_token_modulation_matches_reference():
    """Wan 2.2: a per-frame denoise mask makes the timestep, and so every gate, differ per token."""
    patcher = tm.build_patcher("wan22")
    _, layout = model_layout(patcher)
    scales = random_scales(len(layout.gates), seed=10)
    x, positive = tm.latent("wan22"), tm.conditioning("wan22")
    mask = torch.ones((1, 1) + x.shape[2:])
    mask[:, :, 0] = 0.0  # first frame kept: its tokens see t = 0, the others t = σ
    shapes = []
    handle = patcher.model.diffusion_model.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["e"].shape)), with_kwargs=True)
    try:
        ours = tm.predict(apply_calibration(patcher, gate_calibration(layout, scales)), x, SIGMA, positive,
                          denoise_mask=mask)
    finally:
        handle.remove()
    assert len(shapes[0]) == 4, f"expected per-token modulation [B, L, 6, D], got {shapes[0]}"
    reference = tm.predict(reference_patcher("wan22", dict(enumerate(scales))), x, SIGMA, positive,
                           denoise_mask=mask)
    plain = tm.predict(patcher, x, SIGMA, positive, denoise_mask=mask)
    assert (ours - plain).abs().max() > 1e-4
    assert (ours - reference).abs().max() <= ATOL


def test_stacked_calibrations_multiply():
    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    first, second = random_scales(len(layout.gates), seed=11), random_scales(len(layout.gates), seed=12)
    x, positive = tm.latent("flux"), tm.conditioning("flux")
    stacked = apply_calibration(apply_calibration(patcher, gate_calibration(layout, first)),
                                gate_calibration(layout, second))
    product = apply_calibration(patcher, gate_calibration(layout, [a * b for a, b in zip(first, second)]))
    assert (tm.predict(stacked, x, SIGMA, positive) - tm.predict(product, x, SIGMA, positive)).abs().max() <= ATOL
