"""Tiny random-weight models built with ComfyUI's own classes, and helpers that run them through
ComfyUI's real sampler path. Shapes follow ../shared/reference/comfyui.md §A (verified there)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QWEN_CLASS = "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"
QWEN_UNET = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
FLUX_PARAMS = "comfy.ldm.flux.model.FluxParams"
FLUX1_NEWER_FIELDS = {"txt_ids_dims": []}  # required since ComfyUI 0.3.76 (Flux.2: [3])
FLUX_BASE = dict(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                 num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True)


@dataclass
class TinySpec:
    """How to build one family's tiny model and its conditioning."""

    config: str                      # class name in comfy.supported_models
    unet: dict
    latent: tuple                    # latent shape without batch
    context: tuple                   # cross-attention tokens, dim
    pooled: int = 0                  # pooled_output width (0 = none)
    guidance: float | None = None
    tanh_gates: bool = False          # keep |tanh(gate)| small so the atanh reference stays defined
    text_mask: bool = False           # pass an all-ones attention_mask (older ComfyUI reads num_tokens from it)
    params: str = ""                  # "module.Class" of the model's params dataclass, when it has one
    newer_fields: dict | None = None  # params fields later ComfyUIs require and older ones reject: passed only
    #                                   where the host's dataclass declares them
    family: str = ""                  # the calibri family detect() must report (default: the spec's key)
    reference_latents: int = 0        # edit models: how many reference latents (the latent's shape) to condition on
    reference_method: str = ""        # reference_latents_method put in the conditioning ("" = the model's default)
    needs: tuple = ()                 # ("module.Class", "kwarg"): skip on hosts whose class lacks that kwarg
    repin: tuple = ()                 # model kwargs the config's unet_extra_config pins to full size, set anyway
    extra_conditioning: dict | None = None  # conditioning key → per-row shape of a random tensor the model also reads
    weight_scale: float = 0.05        # std of the random weights (larger where a stream's effect would drown in fp32)


SPECS = {
    "flux": TinySpec("Flux", dict(FLUX_BASE, image_model="flux"), (16, 8, 8), (5, 32), pooled=24, guidance=3.5,
                     params=FLUX_PARAMS, newer_fields=FLUX1_NEWER_FIELDS),
    # Flux-class models that are not FLUX.1 (ComfyUI >= 0.3.76), detected from their params as ComfyUI does.
    "longcat_image": TinySpec("LongCatImage", dict(FLUX_BASE, image_model="flux", guidance_embed=False, vec_in_dim=None,
                                                   context_in_dim=3584, txt_ids_dims=[1, 2]),
                              (16, 8, 8), (5, 3584)),
    "ovis_image": TinySpec("Flux", dict(FLUX_BASE, image_model="flux", guidance_embed=False, vec_in_dim=None,
                                        yak_mlp=True, txt_norm=True, txt_ids_dims=[1, 2]),
                           (16, 8, 8), (5, 32), needs=(FLUX_PARAMS, "yak_mlp")),
    "flux2": TinySpec("Flux2", dict(FLUX_BASE, image_model="flux2", in_channels=32, out_channels=32, vec_in_dim=None,
                                    mlp_ratio=3.0, axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1, qkv_bias=False,
                                    global_modulation=True, mlp_silu_act=True, ops_bias=False),
                      (32, 4, 4), (5, 32), guidance=3.5, params=FLUX_PARAMS, newer_fields={"txt_ids_dims": [3]}),
    "chroma": TinySpec("Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32,
                                      hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                                      theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32,
                                      n_layers=2, mlp_ratio=4.0),
                       (16, 8, 8), (5, 32), params="comfy.ldm.chroma.model.ChromaParams",
                       newer_fields={"txt_ids_dims": [], "vec_in_dim": None}),
    "sd3": TinySpec("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=4, adm_in_channels=32,
                                context_embedder_config={"target": "torch.nn.Linear",
                                                         "params": {"in_features": 48, "out_features": 256}},
                                num_patches=256, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=[0, 1],
                                input_size=None, pos_embed_scaling_factor=None),
                    (16, 8, 8), (5, 48), pooled=32),
    "qwen_image": TinySpec("QwenImage", QWEN_UNET, (16, 1, 8, 8), (5, 32)),
    # Qwen-Image-Edit with the reference image appended as tokens ("index", the 2509 default) and 2511's
    # "index_timestep_zero", which doubles the timestep batch inside the model ([t, 0·t]).
    "qwen_edit_index": TinySpec("QwenImage", QWEN_UNET, (16, 1, 8, 8), (5, 32), family="qwen_image",
                                reference_latents=1, reference_method="index"),
    "qwen_edit_2511": TinySpec("QwenImage", dict(QWEN_UNET, default_ref_method="index_timestep_zero"),
                               (16, 1, 8, 8), (5, 32), family="qwen_image", reference_latents=1,
                               needs=(QWEN_CLASS, "default_ref_method")),
    "lumina2": TinySpec("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2,
                                        n_refiner_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16,
                                        ffn_dim_multiplier=4.0, qk_norm=True, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                        axes_lens=[300, 512, 512]),
                        (16, 8, 8), (7, 32), text_mask=True),
    "z_image": TinySpec("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=2,
                                       n_refiner_layers=1, n_heads=16, n_kv_heads=16, multiple_of=16,
                                       ffn_dim_multiplier=8 / 3, qk_norm=True, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                       axes_lens=[300, 512, 512], z_image_modulation=True, time_scale=1000,
                                       pad_tokens_multiple=32, rope_theta=256),
                        (16, 8, 8), (7, 32), tanh_gates=True, text_mask=True),
    "wan": TinySpec("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64,
                                      ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=4, num_layers=2),
                    (16, 2, 8, 8), (5, 32)),
    # Wan 2.2 5B layout: a denoise mask turns the timestep per frame, and with it the gates per token.
    "wan22": TinySpec("WAN22_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=48,
                                        dim=64, ffn_dim=128, freq_dim=32, text_dim=32, out_dim=48, num_heads=4,
                                        num_layers=2),
                      (48, 3, 8, 8), (5, 32), family="wan"),
}
from tiny_specs_part2 import AV_SPECS_PART2, SPECS_PART2  # noqa: E402  (issue 11, part 2: needs TinySpec above)

SPECS.update(SPECS_PART2)
from tiny_specs_part1 import SPECS_PART1  # noqa: E402  (issue 11, part 1: needs TinySpec above)

SPECS.update(SPECS_PART1)
FAMILIES = tuple(SPECS)
SPECS.update(AV_SPECS_PART2)  # nested (video, audio) latents: tests/test_audio_video.py


def family_of(spec_name: str) -> str:
    """The calibri family a tiny spec's model belongs to."""
    return SPECS[spec_name].family or spec_name


def host_fields(params: str, fields: dict) -> dict:
    """The entries of ``fields`` that this host's params dataclass ``params`` ("module.Class") declares."""
    import dataclasses
    import importlib

    module, name = params.rsplit(".", 1)
    declared = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    return {k: v for k, v in fields.items() if k in declared}


def flux1_unet(unet: dict) -> dict:
    """Flux.1 model kwargs plus the params fields this host requires (for models built outside SPECS)."""
    return dict(unet, **host_fields(FLUX_PARAMS, FLUX1_NEWER_FIELDS))


def host_unet_config(spec: TinySpec, overrides: dict) -> dict:
    """The spec's model kwargs plus those of its ``newer_fields`` that this host declares, then ``overrides``."""
    return dict(spec.unet, **(host_fields(spec.params, spec.newer_fields) if spec.newer_fields else {}), **overrides)


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A ComfyUI BaseModel of ``family`` with random weights (randn · the spec's weight_scale, seeded); ``overrides``
    replace entries of the family's model kwargs (e.g. ``depth=10``)."""
    import comfy.supported_models as supported

    spec = SPECS[family]
    if not hasattr(supported, spec.config):
        import pytest

        pytest.skip(f"{family}: this ComfyUI has no {spec.config} model (added in a later ComfyUI version)")
    if spec.needs and not _accepts_kwarg(*spec.needs):
        import pytest

        pytest.skip(f"{family}: this ComfyUI's {spec.needs[0]} has no {spec.needs[1]!r} (added in a later version)")
    config = getattr(supported, spec.config)(host_unet_config(spec, overrides))
    config.unet_config.update({k: host_unet_config(spec, overrides)[k] for k in spec.repin})
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.diffusion_model.state_dict(keep_vars=True).items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * spec.weight_scale)
        if spec.tanh_gates:
            for name, tensor in model.diffusion_model.state_dict(keep_vars=True).items():
                if "adaLN_modulation" in name:
                    tensor.mul_(0.1)
    return model.to(dtype)


def _accepts_kwarg(class_path: str, kwarg: str) -> bool:
    import importlib
    import inspect

    module, name = class_path.rsplit(".", 1)
    return kwarg in inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters


def build_patcher(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    model = build_model(family, seed, dtype, **overrides)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(family: str, seed: int = 1, batch: int = 1) -> list:
    """ComfyUI CONDITIONING for the tiny model: [[cross_attn, {pooled_output, guidance}]]."""
    spec = SPECS[family]
    generator = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(batch, spec.pooled, generator=generator) if spec.pooled else None}
    if spec.text_mask:
        options["attention_mask"] = torch.ones(batch, spec.context[0], dtype=torch.long)
    if spec.guidance is not None:
        options["guidance"] = spec.guidance
    if spec.reference_latents:
        options["reference_latents"] = [torch.randn((batch,) + spec.latent, generator=generator)
                                         for _ in range(spec.reference_latents)]
    if spec.reference_method:
        options["reference_latents_method"] = spec.reference_method
    for key, shape in (spec.extra_conditioning or {}).items():
        options[key] = torch.randn((batch,) + shape, generator=generator)
    return [[torch.randn((batch,) + spec.context, generator=generator), options]]


def latent(family: str, seed: int = 2, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + SPECS[family].latent, generator=generator)


def predict(patcher, x: torch.Tensor, sigma: float, positive: list, negative: list | None = None, cfg: float = 1.0,
            guider=None, denoise_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One denoised prediction through ComfyUI's real sampling path (guider → sampler → model).

    A one-step custom KSAMPLER calls the guided denoiser once at ``sigma`` and records its output, so
    object patches, wrappers and cond batching are exercised exactly as in a sampling run. The model
    sees σ·x (flow noise scaling on an all-zero latent). Pass ``guider`` to use another GUIDER.
    """
    import comfy.samplers

    seen = {}

    def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["denoised"] = model(noise, sigmas[0] * noise.new_ones([noise.shape[0]]), **(extra_args or {}))
        return seen["denoised"]

    if guider is None:
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_cfg(cfg)
    guider.set_conds(positive, negative if negative is not None else positive)
    sampler = comfy.samplers.KSAMPLER(one_call)
    sigmas = torch.tensor([sigma, 0.0])
    with torch.no_grad():
        guider.sample(stream_wise(x, torch.clone), stream_wise(x, torch.zeros_like), sampler, sigmas,
                      denoise_mask=denoise_mask, seed=0)
    return seen["denoised"]


def stream_wise(x, make):
    """``make`` applied to a latent, or to each stream of a NestedTensor latent (audio-video models; the sampler packs
    it, so predict then returns the packed x0)."""
    if not getattr(x, "is_nested", False):
        return make(x)
    import comfy.nested_tensor

    return comfy.nested_tensor.NestedTensor([make(t) for t in x.unbind()])


def sample_with_guider(guider, family: str, seed: int = 0, steps: int = 4, sampler_name: str = "euler",
                       scheduler: str = "simple") -> torch.Tensor:
    """A full run through SamplerCustomAdvanced's path: guider.sample with ComfyUI's sigmas and sampler."""
    import comfy.sample
    import comfy.samplers

    empty = torch.zeros((1,) + SPECS[family].latent)
    noise = comfy.sample.prepare_noise(empty, seed)
    guider.set_conds(conditioning(family, seed=11), conditioning(family, seed=12))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), scheduler,
                                             steps)
    sampler = comfy.samplers.sampler_object(sampler_name)
    with torch.no_grad():
        return guider.sample(noise, empty, sampler, sigmas, seed=seed, disable_pbar=True)


def sample(patcher, family: str, seed: int = 0, steps: int = 3, cfg: float = 1.0, batch: int = 1,
           sampler_name: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """A full comfy.sample.sample run from noise on an empty latent."""
    import comfy.sample

    empty = torch.zeros((batch,) + SPECS[family].latent)
    noise = comfy.sample.prepare_noise(empty, seed)
    positive = conditioning(family, seed=11)
    negative = conditioning(family, seed=12)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, empty,
                               seed=seed, disable_pbar=True)


# Wan variants (tests/test_wan_variants.py). Added after FAMILIES so the per-family engine tests keep their list;
# the extra conditioning each variant needs lives in that test module.
_WAN_TINY = dict(image_model="wan2.1", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                 out_dim=16, num_heads=4, num_layers=2)
_WAN_LATENT = (16, 2, 8, 8)
SPECS.update({
    "wan_vace": TinySpec("WAN21_Vace", dict(_WAN_TINY, model_type="vace", vace_layers=1, vace_in_dim=96),
                         _WAN_LATENT, (5, 32), family="wan"),
    "wan_camera": TinySpec("WAN21_Camera", dict(_WAN_TINY, model_type="camera", in_dim=32, in_dim_control_adapter=24),
                           _WAN_LATENT, (5, 32), family="wan"),
    "wan_s2v": TinySpec("WAN22_S2V", dict(_WAN_TINY, model_type="s2v", audio_dim=32, num_audio_token=4,
                                          audio_inject_layers=[0, 1]),
                        _WAN_LATENT, (5, 32), family="wan"),
    "wan_humo": TinySpec("WAN21_HuMo", dict(_WAN_TINY, model_type="humo"), _WAN_LATENT, (5, 32), family="wan"),
    "wan_animate": TinySpec("WAN22_Animate", dict(_WAN_TINY, model_type="animate", in_dim=36), _WAN_LATENT, (5, 32),
                            family="wan"),
    # frame 0 is the reference-image slot; the pose video has the other two frames
    "wan_animate2": TinySpec("WAN_Animate2", dict(_WAN_TINY, model_type="animate2", in_dim=36), (16, 3, 8, 8),
                             (5, 32), family="wan"),
    "wan_scail": TinySpec("WAN21_SCAIL", dict(_WAN_TINY, model_type="scail", in_dim=20), _WAN_LATENT, (5, 32),
                          family="wan"),
    "wan_scail2": TinySpec("WAN21_SCAIL2", dict(_WAN_TINY, model_type="scail2", in_dim=20, mask_in_dim=28),
                           _WAN_LATENT, (5, 32), family="wan"),
    "wan_dancer": TinySpec("WAN22_WanDancer", dict(_WAN_TINY, model_type="wandancer", in_dim=36,
                                                   audio_inject_layers=[0, 1], music_dim=32, music_heads=4,
                                                   music_latent_dim=32),
                           _WAN_LATENT, (5, 32), family="wan"),
    "wan_causal": TinySpec("WAN21_CausalAR_T2V", dict(_WAN_TINY, model_type="t2v"), _WAN_LATENT, (5, 32),
                           family="wan"),
})

# Z-Image variants (tests/test_lumina_variants.py), added after FAMILIES like the Wan variants. Omni is plain NextDiT
# built with a SigLIP embedder and refiner and conditioned with a reference latent (its conditioning adds the
# reference captions and CLIP-vision features); pixel space is NextDiTPixelSpace, an RGB-patch decoder head.
_Z_IMAGE_TINY = dict(SPECS["z_image"].unet)
SPECS.update({
    "z_image_omni": TinySpec("ZImage", dict(_Z_IMAGE_TINY, siglip_feat_dim=24), (16, 8, 8), (7, 32), tanh_gates=True,
                             text_mask=True, family="z_image", reference_latents=1,
                             needs=("comfy.ldm.lumina.model.NextDiT", "siglip_feat_dim")),
    "z_image_pixel": TinySpec("ZImagePixelSpace", dict(_Z_IMAGE_TINY, image_model="zimage_pixel", patch_size=4,
                                                       in_channels=3, decoder_hidden_size=32,
                                                       decoder_num_res_blocks=2, decoder_max_freqs=4,
                                                       decoder_in_channels=48),
                              (3, 16, 16), (7, 32), tanh_gates=True, text_mask=True, family="z_image"),
})

# Flux variants (tests/test_flux_variants.py), added after FAMILIES like the Wan variants. Chroma Radiance is Chroma
# in pixel space with a NeRF head; the second spec takes the newer x0-prediction head (conv), sequential text ids and
# a tiled NeRF pass. Flux.2 Klein (no guidance embedding; ComfyUI's detection sets default_ref_method "index" and
# ref_index_scale 10) conditioned on one reference latent, by "index" and by "index_timestep_zero" (ComfyUI >= 0.3.76:
# the model doubles the timesteps to [t, 0·t] and modulates the reference tokens with the t = 0 half).
_CHROMA_RADIANCE_PARAMS = "comfy.ldm.chroma_radiance.model.ChromaRadianceParams"
_CHROMA_RADIANCE_TINY = dict(SPECS["chroma"].unet, image_model="chroma_radiance", in_channels=3, out_channels=3,
                             patch_size=4, nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4,
                             nerf_tile_size=512, nerf_final_head_type="linear", nerf_embedder_dtype=torch.float32)
_KLEIN_TINY = dict(SPECS["flux2"].unet, guidance_embed=False, default_ref_method="index", ref_index_scale=10.0)
SPECS.update({
    "chroma_radiance": TinySpec("ChromaRadiance", _CHROMA_RADIANCE_TINY, (3, 16, 16), (5, 32),
                                params=_CHROMA_RADIANCE_PARAMS, family="chroma",
                                newer_fields={"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False,
                                              "use_sequential_txt_ids": False}),
    "chroma_radiance_x0": TinySpec("ChromaRadiance", dict(_CHROMA_RADIANCE_TINY, nerf_final_head_type="conv",
                                                          nerf_tile_size=8, use_x0=True, use_sequential_txt_ids=True),
                                   (3, 16, 16), (5, 32), params=_CHROMA_RADIANCE_PARAMS, family="chroma",
                                   newer_fields={"txt_ids_dims": [], "vec_in_dim": None},
                                   needs=(_CHROMA_RADIANCE_PARAMS, "use_x0")),
    "klein_ref_index": TinySpec("Flux2", _KLEIN_TINY, (32, 4, 4), (5, 32), params=FLUX_PARAMS,
                                newer_fields={"txt_ids_dims": [3]}, family="flux2", reference_latents=1,
                                reference_method="index"),
    "klein_ref_timestep_zero": TinySpec("Flux2", _KLEIN_TINY, (32, 4, 4), (5, 32), params=FLUX_PARAMS,
                                        newer_fields={"txt_ids_dims": [3]}, family="flux2", reference_latents=1,
                                        reference_method="index_timestep_zero"),
})
