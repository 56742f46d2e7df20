"""Tiny random-weight models built with ComfyUI's own classes, and helpers that run them through
ComfyUI's real sampler path. Shapes follow ../shared/reference/comfyui.md §A (verified there)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


SPECS = {
    "flux": TinySpec("Flux", dict(FLUX_BASE, image_model="flux"), (16, 8, 8), (5, 32), pooled=24, guidance=3.5),
    "flux2": TinySpec("Flux2", dict(FLUX_BASE, image_model="flux2", in_channels=32, out_channels=32, vec_in_dim=None,
                                    mlp_ratio=3.0, axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1, qkv_bias=False,
                                    global_modulation=True, mlp_silu_act=True, ops_bias=False),
                      (32, 4, 4), (5, 32), guidance=3.5),
    "chroma": TinySpec("Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32,
                                      hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                                      theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32,
                                      n_layers=2, mlp_ratio=4.0),
                       (16, 8, 8), (5, 32)),
    "sd3": TinySpec("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=4, adm_in_channels=32,
                                context_embedder_config={"target": "torch.nn.Linear",
                                                         "params": {"in_features": 48, "out_features": 256}},
                                num_patches=256, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=[0, 1],
                                input_size=None, pos_embed_scaling_factor=None),
                    (16, 8, 8), (5, 48), pooled=32),
    "qwen_image": TinySpec("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16,
                                             num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                             joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
                           (16, 1, 8, 8), (5, 32)),
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
                      (48, 3, 8, 8), (5, 32)),
}
FAMILIES = tuple(SPECS)


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A ComfyUI BaseModel of ``family`` with random weights (randn·0.05, seeded); ``overrides``
    replace entries of the family's model kwargs (e.g. ``depth=10``)."""
    import comfy.supported_models as supported

    spec = SPECS[family]
    if not hasattr(supported, spec.config):
        import pytest

        pytest.skip(f"{family}: this ComfyUI has no {spec.config} model (added in a later ComfyUI version)")
    config = getattr(supported, spec.config)(dict(spec.unet, **overrides))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.diffusion_model.state_dict(keep_vars=True).items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        if spec.tanh_gates:
            for name, tensor in model.diffusion_model.state_dict(keep_vars=True).items():
                if "adaLN_modulation" in name:
                    tensor.mul_(0.1)
    return model.to(dtype)


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
        guider.sample(x.clone(), torch.zeros_like(x), sampler, sigmas, denoise_mask=denoise_mask, seed=0)
    return seen["denoised"]


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
