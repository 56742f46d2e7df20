"""Flux-class variants beyond the plain tiny models of tests/test_engine.py:

* Chroma Radiance (``comfy.ldm.chroma_radiance.model.ChromaRadiance``, a Chroma subclass): pixel space, a NeRF head
  instead of the final layer, the same double and single blocks fed by Chroma's approximator; also its newer
  x0-prediction head with sequential text ids and a tiled NeRF pass.
* Flux.2 Klein conditioned on a reference latent by ``index`` and by ``index_timestep_zero``. The latter doubles the
  timesteps inside the model to ``[t, 0·t]``; with global modulation every modulation vector becomes [B, 2, D] and
  ``modulation_dims`` picks the t = 0 half for the reference tokens. Calibri's Flux.2 gates are branch outputs,
  which keep batch B, so every row must still get its own scales.

Each case must be bit-identical at identity, move and match the independent reference (tests/engine_reference.py) for
every gate alone, keep different calibrations on the rows of one batch apart, equal ComfyUI's own 'dit' block skip
when all gates of a block are 0, and (Flux.2) sample a 3-member ensemble exactly.

FLUX.1 with ``index_timestep_zero`` is not a case: ComfyUI's own model crashes on it (the per-block modulation gets
the doubled batch while the image tokens keep B), and so does Flux.2 dev (guidance embedding) at batch 2;
test_index_timestep_zero_crashes_in_comfyui_itself watches for the day they run.
"""

from __future__ import annotations

import inspect

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher
from site_checks import gate_calibration, one_gate
from test_ensemble import _calibration, _expected, _one, _scales

from calibri_core import Calibration
from calibri_core.host import apply_calibration, apply_row_scales, model_layout

SIGMA = 0.7
ATOL = 1e-5
SCALE = 1.6
REPRODUCED = 0.01  # as tests/test_no_inert_site.py: the reference reproduces 1 % of the move, or fp32 rounding
ROUNDING = 1e-6

CASES = {  # tiny spec → (diffusion model class path, family)
    "chroma_radiance": ("comfy.ldm.chroma_radiance.model.ChromaRadiance", "chroma"),
    "chroma_radiance_x0": ("comfy.ldm.chroma_radiance.model.ChromaRadiance", "chroma"),
    "klein_ref_index": ("comfy.ldm.flux.model.Flux", "flux2"),
    "klein_ref_timestep_zero": ("comfy.ldm.flux.model.Flux", "flux2"),
}
KLEIN = ["klein_ref_index", "klein_ref_timestep_zero"]
DIT_BLOCKS = [("double_blocks.1", ("double_block", 1)), ("single_blocks.1", ("single_block", 1))]


def _host_has_timestep_zero() -> bool:
    """Newer ComfyUIs run "index_timestep_zero"; 0.3.75's Flux silently falls back to the "offset" method."""
    import comfy.ldm.flux.model

    return "timestep_zero_index" in inspect.signature(comfy.ldm.flux.model.Flux.forward_orig).parameters


def _require_host(spec: str) -> None:
    if tm.SPECS[spec].reference_method == "index_timestep_zero" and not _host_has_timestep_zero():
        pytest.skip(f"{spec}: this ComfyUI's Flux has no 'index_timestep_zero' reference method (added in a later "
                    "version)")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    _require_host(request.param)
    return request.param


@pytest.fixture(scope="module")
def patcher(case):
    return tm.build_patcher(case)


@pytest.fixture(scope="module")
def inputs(case):
    return tm.latent(case), tm.conditioning(case)


def run(patcher, x, positive) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction, and the transformer's output as the output head receives it (Flux.2's final layer, Chroma
    Radiance's NeRF blocks: every tile of it).

    Chroma Radiance's NeRF head passes the transformer output only through the direction of the per-patch MLP
    weights it generates, so in the random tiny model a gate that moves the transformer output by 1e-2 moves the
    prediction by 1e-5 (a text gate: 1e-4 and 1e-7, a few ulp of the input). The transformer output is where such
    a gate can be compared with its reference beyond rounding; the prediction must still move and match.
    """
    dm = patcher.model.diffusion_model
    head, position = (dm.final_layer, 0) if hasattr(dm, "final_layer") else (dm.nerf_blocks[0], 1)
    seen = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[position].detach().clone()))
    try:
        prediction = tm.predict(patcher, x, SIGMA, positive)
    finally:
        handle.remove()
    return prediction, torch.cat(seen)


@pytest.fixture(scope="module")
def base(patcher, inputs):
    x, positive = inputs
    return run(patcher, x, positive)


def _matches(ours, reference, base, floor: float) -> tuple[bool, str]:
    """Moved from ``base`` (not bit-identical) and equal to ``reference`` to ATOL and to 1 % of the move or fp32
    rounding of ``floor`` (the largest magnitude the computation carried), as tests/test_no_inert_site.py."""
    moved, error = float((ours - base).abs().max()), float((ours - reference).abs().max())
    ok = moved > 0.0 and error <= ATOL and error <= max(REPRODUCED * moved, ROUNDING * floor)
    return ok, f"moved {moved:.2e}, |ours - reference| = {error:.2e}"


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def test_case_is_detected_with_its_family_layout(case, patcher):
    path, family_name = CASES[case]
    assert _path(patcher.model.diffusion_model) == path
    family, layout = model_layout(patcher)
    assert family.name == family_name
    assert layout.site_names("gate") == (
        "double_blocks.0.img.attn", "double_blocks.0.img.mlp", "double_blocks.0.txt.attn", "double_blocks.0.txt.mlp",
        "double_blocks.1.img.attn", "double_blocks.1.img.mlp", "double_blocks.1.txt.attn", "double_blocks.1.txt.mlp",
        "single_blocks.0", "single_blocks.1")


@pytest.mark.parametrize("spec_name", KLEIN)
def test_reference_latent_reaches_the_model(spec_name):
    """The conditioning's reference latent is appended as tokens, and index_timestep_zero doubles the timesteps."""
    _require_host(spec_name)
    spec, patcher = tm.SPECS[spec_name], tm.build_patcher(spec_name)
    dm = patcher.model.diffusion_model
    seen = {}
    handle = dm.double_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(img=kw["img"], vec=kw["vec"], kw=kw), with_kwargs=True)
    x = tm.latent(spec_name)
    try:
        tm.predict(patcher, x, SIGMA, tm.conditioning(spec_name))
    finally:
        handle.remove()
    tokens = x.shape[-1] * x.shape[-2] // dm.patch_size ** 2
    assert seen["img"].shape[1] == 2 * tokens, "the reference latent's tokens follow the image tokens"
    (img_mod, _), _ = seen["vec"]
    if spec.reference_method == "index_timestep_zero":
        assert tuple(img_mod.gate.shape) == (1, 2, dm.hidden_size)
        assert seen["kw"]["modulation_dims_img"] == [(0, tokens, 0), (tokens, 2 * tokens, 1)]
    else:
        assert tuple(img_mod.gate.shape) == (1, 1, dm.hidden_size)


def test_identity_is_bit_identical(case, patcher, inputs, base):
    _, layout = model_layout(patcher)
    x, positive = inputs
    for granularity in ("block", "layer", "gate"):
        calibrated = apply_calibration(patcher, Calibration.identity(layout, granularity))
        assert torch.equal(tm.predict(calibrated, x, SIGMA, positive), base[0]), granularity


def test_every_gate_alone_changes_the_prediction_and_matches_the_reference(case, patcher, inputs, base):
    _, layout = model_layout(patcher)
    x, positive = inputs
    base_prediction, base_hidden = base
    floor = max(float(base_prediction.abs().max()), float((SIGMA * x).abs().max()))  # x0 = x_in − σ·v
    for index, gate in enumerate(layout.gates):
        site = gate.name("gate")
        ours = run(apply_calibration(patcher, one_gate(layout, index, SCALE)), x, positive)
        reference = run(reference_patcher(case, {index: SCALE}), x, positive)
        assert float((reference[1] - base_hidden).abs().max()) > 1e-5, f"the reference of {site} has no effect"
        ok, report = _matches(ours[1], reference[1], base_hidden, float(base_hidden.abs().max()))
        assert ok and float((ours[1] - base_hidden).abs().max()) > 1e-5, f"{site}, transformer output: {report}"
        ok, report = _matches(ours[0], reference[0], base_prediction, floor)
        assert ok, f"{site}, prediction: {report}"


def test_rows_of_one_batch_carry_different_calibrations(case, patcher):
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    rows = torch.tensor([_scales(n, 1), _scales(n, 2)], dtype=torch.float32)
    x, positive = tm.latent(case, batch=2), tm.conditioning(case)
    both = run(apply_row_scales(patcher, lambda options, batch: rows), x, positive)
    for i in range(2):
        alone = run(apply_calibration(patcher, gate_calibration(layout, rows[i].tolist())), x[i:i + 1], positive)
        assert (both[0][i:i + 1] - alone[0]).abs().max() <= ATOL, i
        width = alone[1].shape[-1]  # Radiance's NeRF rows are [B·patches, D], batch-major
        assert (both[1].reshape(2, -1, width)[i] - alone[1].reshape(-1, width)).abs().max() <= ATOL, i


def _skip_block(args, extra):
    return {key: args[key] for key in ("img", "txt") if key in args}


def test_zero_gates_equal_comfyui_block_skip(case, patcher, inputs, base):
    _, layout = model_layout(patcher)
    x, positive = inputs
    for block, replace_key in DIT_BLOCKS:
        skipped = patcher.clone()
        skipped.set_model_patch_replace(_skip_block, "dit", *replace_key)
        expected = run(skipped, x, positive)
        scales = [0.0 if g.block == block else 1.0 for g in layout.gates]
        ours = run(apply_calibration(patcher, gate_calibration(layout, scales)), x, positive)
        assert (expected[1] - base[1]).abs().max() > 1e-3, f"skipping {block} acts"
        assert (expected[0] - base[0]).abs().max() > 0, f"skipping {block} moves the prediction"
        for got, want in zip(ours, expected):
            assert (got - want).abs().max() <= ATOL, block


@pytest.mark.parametrize("spec", KLEIN)
def test_ensemble_guider_equals_weighted_sum_of_members(spec):
    """Three members (one on the negative prompt) in one batched forward, and one at a time, through EnsembleGuider."""
    from calibri_core.sampling import EnsembleGuider

    _require_host(spec)
    patcher = tm.build_patcher(spec)
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    members = (_one(layout, _scales(n, 1), 3.0, "positive"), _one(layout, _scales(n, 2), -2.0, "negative"),
               _one(layout, _scales(n, 3), 0.5, "positive"))
    x, positive, negative = tm.latent(spec), tm.conditioning(spec, seed=1), tm.conditioning(spec, seed=9)
    expected = _expected(patcher, layout, members, x, positive, negative)
    batches = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        for low_vram in (False, True):
            guider = EnsembleGuider(patcher, _calibration(layout, *members), low_vram=low_vram)
            ours = tm.predict(None, x, SIGMA, positive, negative, guider=guider)
            assert (ours - expected).abs().max() <= ATOL, f"low_vram={low_vram}"
    finally:
        handle.remove()
    assert batches[-4:] == [3, 1, 1, 1], "the members share one forward unless low_vram"


def _timestep_zero_conditioning(spec: str) -> list:
    [[cross_attn, options]] = tm.conditioning(spec)
    generator = torch.Generator().manual_seed(5)
    options.update(reference_latents=[torch.randn((1,) + tm.SPECS[spec].latent, generator=generator)],
                   reference_latents_method="index_timestep_zero")
    return [[cross_attn, options]]


@pytest.mark.parametrize("spec, batch, error", [
    ("flux", 1, "doesn't match the broadcast shape"),
    ("flux2", 2, "must match the size of tensor"),
])
def test_index_timestep_zero_crashes_in_comfyui_itself(spec, batch, error):
    """ComfyUI's own forward fails on these, uncalibrated:

    * FLUX.1 (per-block modulation), any batch: each block's modulation Linear gets the doubled batch [t, 0·t]
      ([2B, 1, 6D] chunks) while apply_mod's modulation_dims multiply the B image rows in place.
    * Flux.2 dev (guidance embedding), batch >= 2: the guidance vector [B, D] is added to the doubled timestep
      vector [2B, D]. Batch 1 runs (Klein, without guidance embedding, runs at any batch: the cases above), so a
      CFG or ensemble batch on Flux.2 dev with this method fails in ComfyUI; low_vram ensembles run one row at a time.

    When a ComfyUI runs one of them, the table must be verified on it (FLUX.1's gate Linear then outputs 2B stacked
    rows: Family.stacked_batch_copies) and this case replaced by real tests.
    """
    if not _host_has_timestep_zero():
        pytest.skip("this ComfyUI's Flux has no 'index_timestep_zero' reference method (added in a later version)")
    patcher = tm.build_patcher(spec)
    positive = _timestep_zero_conditioning(spec)
    if batch > 1:
        assert torch.isfinite(tm.predict(patcher, tm.latent(spec), SIGMA, positive)).all(), "batch 1 runs"
    with pytest.raises(RuntimeError, match=error):
        tm.predict(patcher, tm.latent(spec, batch=batch), SIGMA, positive)
