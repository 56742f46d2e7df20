"""Every Wan variant ComfyUI ships (every subclass of comfy.ldm.wan.model.WanModel): each gate, scaled alone,
must change the prediction and match an independent reference; identity must be bit-identical. Subclasses
the Wan table has not verified must be refused by detection.

Each variant runs through ComfyUI's sampling path with the conditioning its nodes would attach (VACE frames,
camera poses, audio features, pose latents, CLIP-vision features, ...), so its own extra modules run too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from engine_reference import reference_patcher
from site_checks import (
    ATOL,
    SIGMA,
    assert_every_gate_matches_its_reference,
    assert_identity_is_bit_identical,
    assert_rows_carry_their_calibrations,
    gate_calibration,
)

from calibri_core import Calibration
from calibri_core.families import detect
from calibri_core.families import wan as wan_table
from calibri_core.host import apply_calibration, apply_row_scales, model_layout

SCALE = 1.7


def _randn(generator, *shape):
    return torch.randn(shape, generator=generator)


def _clip_vision(generator, tokens=4):
    """What CLIPVisionEncode hands the conditioning: an object with penultimate_hidden_states [B, tokens, 1280]."""
    return SimpleNamespace(penultimate_hidden_states=_randn(generator, 1, tokens, 1280))


def _vace(g):
    return {"vace_frames": [_randn(g, 1, 32, 2, 8, 8)], "vace_mask": [(_randn(g, 1, 64, 2, 8, 8) > 0).float()],
            "vace_strength": [0.8]}


def _camera(g):  # Plücker embedding in pixel space (8× the latent), 24 channels
    return {"camera_conditions": _randn(g, 1, 24, 2, 64, 64), "concat_latent_image": _randn(g, 1, 16, 2, 8, 8),
            "clip_vision_output": _clip_vision(g)}


def _s2v(g):  # audio features [B, 25 encoder layers, audio_dim, 4 per latent frame]
    return {"audio_embed": _randn(g, 1, 25, 32, 8), "reference_latents": [_randn(g, 1, 16, 1, 8, 8)],
            "control_video": _randn(g, 1, 16, 2, 8, 8)}


def _humo(g):  # whisper features [B, frames, window 8, 5 layers, 1280]
    return {"audio_embed": _randn(g, 1, 2, 8, 5, 1280), "reference_latents": [_randn(g, 1, 16, 1, 8, 8)]}


def _animate(g):  # no face video: the tiny model has num_layers // 5 = 0 face blocks
    return {"pose_video_latent": _randn(g, 1, 16, 1, 8, 8), "concat_latent_image": _randn(g, 1, 16, 2, 8, 8),
            "clip_vision_output": _clip_vision(g)}


def _animate2(g):
    return {"pose_video_latent": _randn(g, 1, 16, 2, 8, 8), "concat_latent_image": _randn(g, 1, 16, 3, 8, 8),
            "clip_vision_output": _clip_vision(g), "cross_attn_pose": _randn(g, 1, 5, 32), "pose_strength": 0.9,
            "reference_strength": 0.8}


def _scail(g):  # the pose video at half resolution, as SCAIL's nodes encode it
    return {"pose_video_latent": _randn(g, 1, 16, 2, 4, 4), "reference_latents": [_randn(g, 1, 16, 1, 8, 8)],
            "clip_vision_output": _clip_vision(g)}


def _scail2(g):  # + identity masks over reference and video frames, and over the pose frames; replacement mode
    return dict(_scail(g), ref_mask_28ch=(_randn(g, 1, 3, 28, 8, 8) > 0).float(),
                driving_mask_28ch=(_randn(g, 1, 2, 28, 4, 4) > 0).float(), ref_mask_flag=False)


def _dancer(g):  # music features [B, frames, 35]; 24 fps takes the global patch embedding and head
    return {"audio_embed": _randn(g, 1, 16, 35), "concat_latent_image": _randn(g, 1, 16, 2, 8, 8),
            "clip_vision_output": _clip_vision(g), "clip_vision_output_ref": _clip_vision(g), "fps": 24}


def _nothing(g):
    return {}


VARIANTS = {  # tiny spec → (diffusion model class path, extra conditioning)
    "wan_vace": ("comfy.ldm.wan.model.VaceWanModel", _vace),
    "wan_camera": ("comfy.ldm.wan.model.CameraWanModel", _camera),
    "wan_s2v": ("comfy.ldm.wan.model.WanModel_S2V", _s2v),
    "wan_humo": ("comfy.ldm.wan.model.HumoWanModel", _humo),
    "wan_animate": ("comfy.ldm.wan.model_animate.AnimateWanModel", _animate),
    "wan_animate2": ("comfy.ldm.wan.model_animate2.WanAnimate2Model", _animate2),
    "wan_scail": ("comfy.ldm.wan.model.SCAILWanModel", _scail),
    "wan_scail2": ("comfy.ldm.wan.model.SCAIL2WanModel", _scail2),
    "wan_dancer": ("comfy.ldm.wan.model_wandancer.WanDancerModel", _dancer),
    "wan_causal": ("comfy.ldm.wan.ar_model.CausalWanModel", _nothing),
}
PLAIN = {"comfy.ldm.wan.model.WanModel": "wan, wan22 (test_engine.py)"}


def conditioning(variant: str, seed: int = 1) -> list:
    [[cross_attn, options]] = tm.conditioning(variant, seed=seed)
    options.update(VARIANTS[variant][1](torch.Generator().manual_seed(seed + 100)))
    return [[cross_attn, options]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def patcher(variant):
    return tm.build_patcher(variant)


@pytest.fixture(scope="module")
def inputs(variant):
    return tm.latent(variant), conditioning(variant)


@pytest.fixture(scope="module")
def base(patcher, inputs):
    x, positive = inputs
    return tm.predict(patcher, x, SIGMA, positive)


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def test_variant_is_detected_with_the_wan_layout(variant, patcher):
    assert _path(patcher.model.diffusion_model) == VARIANTS[variant][0]
    family, layout = model_layout(patcher)
    assert family.name == "wan"
    assert layout.site_names("gate") == ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")
    assert [g.module for g in layout.gates] == ["blocks.0.self_attn.o", "blocks.0.ffn", "blocks.1.self_attn.o",
                                                "blocks.1.ffn"]


def test_identity_is_bit_identical(variant, patcher, inputs, base):
    assert_identity_is_bit_identical(patcher, *inputs, base)


def test_every_gate_alone_changes_the_prediction_and_matches_the_reference(variant, patcher, inputs, base):
    assert_every_gate_matches_its_reference(patcher, *inputs, base, lambda scales: reference_patcher(variant, scales),
                                            SCALE)


def test_rows_of_one_batch_carry_different_calibrations(variant, patcher):
    """Per-row scales (ensembles, the search) reach every branch of the variant's blocks, pose branches included."""
    rows = torch.tensor([[0.6, 1.3, 1.5, 0.8], [1.4, 0.7, 0.9, 1.2]], dtype=torch.float32)
    assert_rows_carry_their_calibrations(patcher, rows, tm.latent(variant, batch=2), conditioning(variant))


def _ar_video(patcher, x, positive):
    """ComfyUI's autoregressive sampler (SamplerARVideo): frame by frame, with the KV cache of earlier frames."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_cfg(1.0)
    guider.set_conds(positive, positive)
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": 1})
    with torch.no_grad():
        return guider.sample(x.clone(), torch.zeros_like(x), sampler, torch.tensor([0.9, 0.5, 0.0]), seed=0,
                             disable_pbar=True)


def test_causal_wan_autoregressive_sampling_matches_the_reference():
    patcher = tm.build_patcher("wan_causal")
    _, layout = model_layout(patcher)
    x, positive = tm.latent("wan_causal"), conditioning("wan_causal")
    base = _ar_video(patcher, x, positive)
    assert torch.equal(_ar_video(apply_calibration(patcher, Calibration.identity(layout, "gate")), x, positive), base)
    scales = [0.6, 1.3, 1.5, 0.8]
    ours = _ar_video(apply_calibration(patcher, gate_calibration(layout, scales)), x, positive)
    reference = _ar_video(reference_patcher("wan_causal", dict(enumerate(scales))), x, positive)
    assert (ours - base).abs().max() > 1e-4
    assert (ours - reference).abs().max() <= ATOL


def _bare(cls):
    """An instance for detection only: detect reads the class before any attribute."""
    return torch.nn.Module.__new__(cls)


def test_the_wan_table_lists_exactly_the_tested_classes():
    # tests/test_no_inert_site.py checks that every WanModel subclass of the host is listed (and tested) or refused
    assert set(PLAIN) | {path for path, _ in VARIANTS.values()} == set(wan_table.VERIFIED)


def test_an_unverified_wan_subclass_is_refused_with_its_name():
    import comfy.ldm.wan.model

    class UnverifiedWan(comfy.ldm.wan.model.WanModel):
        pass

    with pytest.raises(ValueError, match=r"Calibri: .*UnverifiedWan\) is a variant of Wan 2.1 / 2.2 that Calibri has "
                                         r"not verified.*Verified classes: .*WanAnimate2Model"):
        detect(_bare(UnverifiedWan))
    # the refusal reaches the nodes' entry point too
    holder = torch.nn.Module()
    holder.diffusion_model = _bare(UnverifiedWan)
    with pytest.raises(ValueError, match="UnverifiedWan"):
        model_layout(SimpleNamespace(model=holder))


def _with_pose_cache(patcher):
    """The model as ComfyUI's WanAnimate2Cache node leaves it: a PoseBranchCache in its transformer_options."""
    import comfy.ldm.wan.model_animate2 as animate2

    cached = patcher.clone()
    cached.model_options["transformer_options"]["animate2_cache"] = animate2.PoseBranchCache()
    return cached


def test_animate2_pose_cache_refuses_rows_it_would_merge():
    """WanAnimate2Cache computes the pose branch from batch row 0 once and reuses it: differing rows are refused."""
    patcher = tm.build_patcher("wan_animate2")
    _, layout = model_layout(patcher)
    rows = torch.tensor([[0.6, 1.3, 1.5, 0.8], [1.4, 0.7, 0.9, 1.2]], dtype=torch.float32)
    x, positive = tm.latent("wan_animate2", batch=2), conditioning("wan_animate2")
    with pytest.raises(RuntimeError, match="animate2_cache.*row 0"):
        tm.predict(apply_row_scales(_with_pose_cache(patcher), lambda options, batch: rows), x, SIGMA, positive)
    # a calibration that changes during the run (here: from the second call on) is refused as well
    calls = []

    def later(options, batch):
        calls.append(batch)
        return rows[:1] if len(calls) > 1 else None

    calibrated = apply_row_scales(_with_pose_cache(patcher), later)
    x1 = tm.latent("wan_animate2")
    tm.predict(calibrated, x1, SIGMA, positive)
    with pytest.raises(RuntimeError, match="animate2_cache.*first step"):
        tm.predict(calibrated, x1, SIGMA, positive)
    # one static calibration is what the cache can hold: it runs, and equals the uncached model; once the cache is
    # freed (ComfyUI frees it after every run) the next run may use another calibration
    static = gate_calibration(layout, rows[0].tolist())
    cached = _with_pose_cache(patcher)
    ours = tm.predict(apply_calibration(cached, static), x1, SIGMA, positive)
    assert (ours - tm.predict(apply_calibration(patcher, static), x1, SIGMA, positive)).abs().max() <= ATOL
    cached.model_options["transformer_options"]["animate2_cache"].free()
    other = gate_calibration(layout, rows[1].tolist())
    ours = tm.predict(apply_calibration(cached, other), x1, SIGMA, positive)
    assert (ours - tm.predict(apply_calibration(patcher, other), x1, SIGMA, positive)).abs().max() <= ATOL
