"""Z-Image variants beyond plain text-to-image NextDiT (tested in test_engine.py): Z-Image Omni and Z-Image pixel space.

* Omni is the same class (``comfy.ldm.lumina.model.NextDiT``) built with a SigLIP embedder and refiner. Conditioned with
  a reference latent (plus the reference captions and CLIP-vision features TextEncodeZImageOmni attaches), it doubles
  its timesteps (``cat([0·t, t])``) and applies each gate per token slice: the noisy image and the main caption take
  the t half, the reference tokens the zero half. Calibri scales the gate's branch (``attention_norm2`` /
  ``ffn_norm2`` outputs, batch B), i.e. both halves of the gate alike. The ``siglip_refiner`` blocks, like the
  ``context_refiner``, are built with ``modulation=False`` and called without ``adaln_input``: ungated, untouched.
* Pixel space (``NextDiTPixelSpace``, ComfyUI >= 0.33) keeps NextDiT's blocks and swaps the final layer for an MLP
  decoder on raw RGB patches (its residual blocks' gates are not DiT gates and are not sites).

Each variant: identity is bit-identical at every granularity; each gate alone at 1.6 changes the prediction and
matches the independent atanh reference (tests/engine_reference.py); two batch rows with different calibrations
equal two separate forwards; the ungated refiners' outputs never change.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher
from site_checks import (
    SIGMA,
    assert_every_gate_matches_its_reference,
    assert_identity_is_bit_identical,
    assert_rows_carry_their_calibrations,
    gate_calibration,
)

from calibri_core.families import detect
from calibri_core.families import lumina as lumina_table
from calibri_core.host import apply_calibration, model_layout

SCALE = 1.6
SIGLIP_DIM = 24  # the omni spec's siglip_feat_dim


def _randn(generator, *shape):
    return torch.randn(shape, generator=generator)


def _omni(g, batchable=False):
    """What TextEncodeZImageOmni attaches for one reference image (tm.conditioning adds the reference latent): the
    captions around it (``<|vision_start|>`` before it, ``<|vision_end|>`` after: one more than there are images)
    and its CLIP-vision (SigLIP) encoding, a 2×2 grid of patch features from a 32×32 image.

    ``batchable``: only the reference's own caption. ComfyUI 0.33 cannot run the caption left over after the last
    reference at batch > 1 (``patchify_and_embed`` builds its rope for the whole batch and every other one for a
    single row, and ``torch.cat`` fails), so the batch tests leave it out."""
    clip_vision = SimpleNamespace(image_sizes=[(3, 32, 32)], last_hidden_state=_randn(g, 1, 4, SIGLIP_DIM))
    captions = [_randn(g, 1, 3, 32), _randn(g, 1, 2, 32)]
    return {"reference_latents_text_embeds": captions[:1] if batchable else captions,
            "clip_vision_outputs": [clip_vision]}


def _nothing(g, batchable=False):
    return {}


VARIANTS = {  # tiny spec → (diffusion model class path, extra conditioning)
    "z_image_omni": ("comfy.ldm.lumina.model.NextDiT", _omni),
    "z_image_pixel": ("comfy.ldm.lumina.model.NextDiTPixelSpace", _nothing),
}


def conditioning(variant: str, seed: int = 1, batchable: bool = False) -> list:
    [[cross_attn, options]] = tm.conditioning(variant, seed=seed)
    options.update(VARIANTS[variant][1](torch.Generator().manual_seed(seed + 100), batchable))
    return [[cross_attn, options]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param


def _with_responsive_decoder(patcher):
    """Pixel space: with randn·0.05 weights (and the ×0.1 adaLN damping of tm's tanh_gates) the tiny decoder barely
    hears the backbone: a gate at 1.6 moves the prediction by ~1e-6. Its conditioning path (cond_embed and the
    residual blocks ×4, their adaLN undamped as well) is amplified alike in our model and in the reference, so every
    gate moves the prediction by ≥ 1e-3."""
    decoder = getattr(patcher.model.diffusion_model, "dec_net", None)
    if decoder is not None:
        with torch.no_grad():
            for name, tensor in decoder.state_dict(keep_vars=True).items():
                if name.startswith(("cond_embed.", "res_blocks.")):
                    tensor.mul_(40.0 if ".adaLN_modulation." in name else 4.0)
    return patcher


def build(variant: str):
    return _with_responsive_decoder(tm.build_patcher(variant))


def reference_model(variant: str, scales: dict):
    return _with_responsive_decoder(reference_patcher(variant, scales))


@pytest.fixture(scope="module")
def patcher(variant):
    return build(variant)


@pytest.fixture(scope="module")
def inputs(variant):
    return tm.latent(variant), conditioning(variant)


@pytest.fixture(scope="module")
def base(patcher, inputs):
    x, positive = inputs
    return tm.predict(patcher, x, SIGMA, positive)


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _record(module, store: dict, key: str):
    return module.register_forward_hook(lambda m, args, out: store.setdefault(key, []).append(out.clone()))


def test_variant_is_detected_with_the_z_image_layout(variant, patcher):
    assert _path(patcher.model.diffusion_model) == VARIANTS[variant][0]
    family, layout = model_layout(patcher)
    assert family.name == "z_image"
    assert layout.site_names("gate") == ("noise_refiner.0.attn", "noise_refiner.0.mlp", "layers.0.attn",
                                         "layers.0.mlp", "layers.1.attn", "layers.1.mlp")
    assert [g.module for g in layout.gates][:2] == ["noise_refiner.0.attention_norm2", "noise_refiner.0.ffn_norm2"]


def test_omni_conditioning_reaches_the_omni_path():
    """The omni spec really runs in omni mode: doubled timestep rows at every gated block, the SigLIP refiner runs."""
    patcher = build("z_image_omni")
    dm = patcher.model.diffusion_model
    seen: dict = {}
    handles = [_record(dm.layers[0].adaLN_modulation, seen, "adaln"), _record(dm.siglip_refiner[0], seen, "siglip"),
               _record(dm.noise_refiner[0].attention_norm2, seen, "branch")]
    try:
        tm.predict(patcher, tm.latent("z_image_omni", batch=2), SIGMA, conditioning("z_image_omni", batchable=True))
    finally:
        for h in handles:
            h.remove()
    assert seen["adaln"][0].shape[0] == 4, "batch 2 in omni mode: [0·t, t] gives 4 modulation rows"
    assert seen["branch"][0].shape[0] == 2, "the gated branches keep the batch of 2"
    assert seen["siglip"], "the SigLIP refiner must run"


def test_identity_is_bit_identical(variant, patcher, inputs, base):
    assert_identity_is_bit_identical(patcher, *inputs, base)


def test_every_gate_alone_changes_the_prediction_and_matches_the_reference(variant, patcher, inputs, base):
    assert_every_gate_matches_its_reference(patcher, *inputs, base, lambda scales: reference_model(variant, scales),
                                            SCALE)


def test_rows_of_one_batch_carry_different_calibrations(variant, patcher):
    """Per-row scales (ensembles, the search); in omni mode the 2 rows run as 4 timestep rows inside the blocks."""
    rows = torch.tensor([[0.6, 1.3, 1.5, 0.8, 1.2, 0.7], [1.4, 0.7, 0.9, 1.2, 0.5, 1.5]], dtype=torch.float32)
    assert_rows_carry_their_calibrations(patcher, rows, tm.latent(variant, batch=2),
                                         conditioning(variant, batchable=True))


def test_ungated_refiners_are_untouched(variant, patcher, inputs):
    dm = patcher.model.diffusion_model
    _, layout = model_layout(patcher)
    x, positive = inputs
    refiners = {f"context_refiner.{i}": block for i, block in enumerate(dm.context_refiner)}
    if dm.siglip_refiner is not None:
        refiners.update({f"siglip_refiner.{i}": block for i, block in enumerate(dm.siglip_refiner)})
    assert refiners and all(not block.modulation for block in refiners.values())
    if variant == "z_image_omni":
        assert any(name.startswith("siglip_refiner") for name in refiners)

    def outputs(model):
        seen: dict = {}
        handles = [_record(block, seen, name) for name, block in refiners.items()]
        try:
            tm.predict(model, x, SIGMA, positive)
        finally:
            for h in handles:
                h.remove()
        assert set(seen) == set(refiners), "every ungated refiner block must run"
        return seen

    plain = outputs(patcher)
    n = len(layout.gates)
    for scales in ([0.0] * n, [0.6, 1.3, 1.5, 0.8, 1.2, 0.7][:n]):
        calibrated = outputs(apply_calibration(patcher, gate_calibration(layout, scales)))
        for name in refiners:
            assert len(calibrated[name]) == len(plain[name]), name
            assert all(torch.equal(a, b) for a, b in zip(calibrated[name], plain[name])), name


def test_the_lumina_tables_list_exactly_the_tested_classes():
    # tests/test_no_inert_site.py checks that every NextDiT subclass of the host is listed (and tested) or refused
    assert set(lumina_table.Z_IMAGE.classes) == {"comfy.ldm.lumina.model.NextDiT",
                                                 "comfy.ldm.lumina.model.NextDiTPixelSpace"}
    assert set(lumina_table.LUMINA2.classes) == {"comfy.ldm.lumina.model.NextDiT"}


def test_pixel_space_is_z_image_not_lumina2():
    patcher = build("z_image_pixel")
    dm = patcher.model.diffusion_model
    assert lumina_table.Z_IMAGE.accepts(dm) and not lumina_table.LUMINA2.accepts(dm)
    assert detect(dm)[0].name == "z_image"
