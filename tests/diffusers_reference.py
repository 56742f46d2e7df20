"""The paper's reference semantics, restated on diffusers models, for fidelity tests of our engine.

The reference implementation (v-gen-ai/Calibri, diffusers-based) scales these diffusers outputs
(see ../shared/reference/calibri-reference.md, "What is scaled"):

* FLUX double blocks: outputs 1 (gate_msa) and 4 (gate_mlp) of ``norm1`` (image) and ``norm1_context`` (text);
  single blocks: output 1 (gate) of ``norm``.
* SD3 / SD3.5: outputs 1 and 4 of ``norm1`` / ``norm1_context`` (absent for the context_pre_only last block) and
  output 6 (gate_msa2) of ``norm1`` in dual-attention blocks.
* Qwen-Image: the outputs of ``attn`` (image, text) and of ``img_mlp`` / ``txt_mlp``.

This module writes those hooks from the reference's description alone, with the site names of the
reference table mapped to ComfyUI's block names by hand, so it shares nothing with ``calibri_core``'s
gate tables. It also builds tiny seeded diffusers transformers whose weights ComfyUI loads through
its own diffusers converters, and runs both sides on the same inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _sd3():
    from diffusers import SD3Transformer2DModel

    # ComfyUI's MMDiT ties hidden size to depth (64·depth, heads = depth): depth 4 → 4 heads of 64.
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                                 num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=256,
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                                 dual_attention_layers=(0, 1), qk_norm="rms_norm")


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                       guidance_embeds=False, axes_dims_rope=(4, 6, 6))


BUILDERS: dict[str, Callable] = {"flux": _flux, "sd3": _sd3, "qwen_image": _qwen_image}


def build_diffusers(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny diffusers transformer with seeded random fp32 weights (randn·0.05 on every parameter).

    Buffers (SD3's sin-cos position table) keep their computed values; ComfyUI receives them with the weights.
    """
    model = BUILDERS[family]().eval()  # fp32 by default
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def comfy_state_dict(model: torch.nn.Module, family: str) -> dict:
    """The diffusers weights in ComfyUI's key space, converted the way ComfyUI loads diffusers files."""
    import comfy.model_detection

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if family == "qwen_image":
        return sd  # ComfyUI's Qwen-Image uses diffusers' own key names
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if converted is None:
        raise ValueError(f"ComfyUI did not recognise the {family} diffusers keys")
    return converted


def comfy_patcher_like(model: torch.nn.Module, family: str):
    """A ComfyUI ModelPatcher (tests/tiny_models config) holding exactly ``model``'s weights."""
    from tiny_models import build_patcher

    patcher = build_patcher(family)
    result = patcher.model.diffusion_model.load_state_dict(comfy_state_dict(model, family), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{family}: weight transfer incomplete: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    return patcher


# --- the reference's scaling, as forward hooks on diffusers modules ------------------------------------------------

@dataclass(frozen=True)
class RefGate:
    """One gate as the reference sees it: a diffusers module, which output, and its site names."""

    module: str        # path inside the diffusers transformer
    output: int | None  # tuple index of the gate in the module's output; None = the whole output is the branch
    block: str         # ComfyUI block name
    stream: str
    branch: str

    def site(self, granularity: str) -> str:
        parts = {"gate": (self.block, self.stream, self.branch), "layer": (self.block, self.branch),
                 "block": (self.block,)}[granularity]
        return ".".join(p for p in parts if p)


def reference_gates(model: torch.nn.Module, family: str) -> list[RefGate]:
    """Every gate the reference scales in ``model``, named with ComfyUI's block names."""
    gates: list[RefGate] = []
    if family == "flux":
        for i, _ in enumerate(model.transformer_blocks):
            block = f"double_blocks.{i}"  # transformer_blocks[i] ↔ double_blocks.i
            for module, stream in (("norm1", "img"), ("norm1_context", "txt")):
                gates += [RefGate(f"transformer_blocks.{i}.{module}", 1, block, stream, "attn"),
                          RefGate(f"transformer_blocks.{i}.{module}", 4, block, stream, "mlp")]
        for i, _ in enumerate(model.single_transformer_blocks):
            gates.append(RefGate(f"single_transformer_blocks.{i}.norm", 1, f"single_blocks.{i}", "", ""))
    elif family == "sd3":
        for i, b in enumerate(model.transformer_blocks):
            block = f"joint_blocks.{i}"
            gates += [RefGate(f"transformer_blocks.{i}.norm1", 1, block, "x", "attn"),
                      RefGate(f"transformer_blocks.{i}.norm1", 4, block, "x", "mlp")]
            if b.use_dual_attention:
                gates.append(RefGate(f"transformer_blocks.{i}.norm1", 6, block, "x", "attn2"))
            if not b.context_pre_only:
                gates += [RefGate(f"transformer_blocks.{i}.norm1_context", 1, block, "context", "attn"),
                          RefGate(f"transformer_blocks.{i}.norm1_context", 4, block, "context", "mlp")]
    elif family == "qwen_image":
        for i, _ in enumerate(model.transformer_blocks):
            block = f"transformer_blocks.{i}"
            gates += [RefGate(f"{block}.attn", 0, block, "img", "attn"),
                      RefGate(f"{block}.attn", 1, block, "txt", "attn"),
                      RefGate(f"{block}.img_mlp", None, block, "img", "mlp"),
                      RefGate(f"{block}.txt_mlp", None, block, "txt", "mlp")]
    else:
        raise ValueError(f"no reference semantics written for {family}")
    return gates


def reference_sites(model: torch.nn.Module, family: str, granularity: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for gate in reference_gates(model, family):
        seen.setdefault(gate.site(granularity), None)
    return tuple(seen)


@contextlib.contextmanager
def reference_scaling(model: torch.nn.Module, family: str, granularity: str,
                      scales: dict[str, float]) -> Iterator[None]:
    """Scale ``model``'s gates as the reference does, while the context is open."""
    by_module: dict[str, list[tuple[int | None, float]]] = {}
    for gate in reference_gates(model, family):
        by_module.setdefault(gate.module, []).append((gate.output, scales[gate.site(granularity)]))

    def hook_for(items: list[tuple[int | None, float]]):
        def hook(module, args, output):
            if items[0][0] is None:
                return output * items[0][1]
            output = list(output)
            for index, scale in items:
                output[index] = output[index] * scale
            return tuple(output)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(items)) for name, items in by_module.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- inputs and the two forwards --------------------------------------------------------------------------------

@dataclass
class Inputs:
    x: torch.Tensor              # ComfyUI latent layout
    sigma: float
    context: torch.Tensor
    pooled: torch.Tensor | None
    guidance: float | None


def make_inputs(family: str, seed: int = 3, sigma: float = 0.7) -> Inputs:
    from tiny_models import SPECS

    spec = SPECS[family]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1,) + spec.latent, generator=generator)
    context = torch.randn((1,) + spec.context, generator=generator)
    pooled = torch.randn(1, spec.pooled, generator=generator) if spec.pooled else None
    return Inputs(x, sigma, context, pooled, spec.guidance)


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, C·4] (diffusers' Flux/Qwen pipelines' _pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _flux_ids(h: int, w: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h // 2, w // 2, 3)
    img[..., 1] += torch.arange(h // 2)[:, None]
    img[..., 2] += torch.arange(w // 2)[None, :]
    return img.reshape(-1, 3), torch.zeros(text, 3)


@torch.no_grad()
def diffusers_velocity(model: torch.nn.Module, family: str, inputs: Inputs) -> torch.Tensor:
    """The diffusers transformer's raw output (flow velocity), in ComfyUI's latent layout."""
    sigma = torch.tensor([inputs.sigma])
    if family == "flux":
        _, c, h, w = inputs.x.shape
        img_ids, txt_ids = _flux_ids(h, w, inputs.context.shape[1])
        out = model(hidden_states=_pack(inputs.x), encoder_hidden_states=inputs.context,
                    pooled_projections=inputs.pooled, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                    guidance=torch.tensor([inputs.guidance]), return_dict=False)[0]
        return _unpack(out, c, h, w)
    if family == "sd3":
        # ComfyUI's discrete-flow sampling feeds the model t = 1000·σ; diffusers takes t as given.
        return model(hidden_states=inputs.x, encoder_hidden_states=inputs.context,
                     pooled_projections=inputs.pooled, timestep=sigma * 1000, return_dict=False)[0]
    if family == "qwen_image":
        _, c, _, h, w = inputs.x.shape
        mask = torch.ones(1, inputs.context.shape[1], dtype=torch.long)
        out = model(hidden_states=_pack(inputs.x[:, :, 0]), encoder_hidden_states=inputs.context,
                    encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=[[(1, h // 2, w // 2)]],
                    return_dict=False)[0]
        return _unpack(out, c, h, w).unsqueeze(2)
    raise ValueError(family)


@torch.no_grad()
def comfy_velocity(patcher, family: str, inputs: Inputs) -> torch.Tensor:
    """The ComfyUI model's velocity for ``inputs``, through the real sampler path.

    Like tiny_models.predict, but the one-step sampler evaluates the guided denoiser at exactly
    ``inputs.x`` (not the sampler's noise-scaled latent), and converts x0 back to v = (x − x0)/σ.
    """
    import comfy.samplers

    options = {"pooled_output": inputs.pooled}
    if inputs.guidance is not None:
        options["guidance"] = inputs.guidance
    positive = [[inputs.context, options]]
    seen = {}

    def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(inputs.x.clone(), sigmas[0] * noise.new_ones([noise.shape[0]]), **(extra_args or {}))
        return seen["x0"]

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sigmas = torch.tensor([inputs.sigma, 0.0])
    guider.sample(inputs.x.clone(), torch.zeros_like(inputs.x), comfy.samplers.KSAMPLER(one_call), sigmas, seed=0)
    return (inputs.x - seen["x0"]) / inputs.sigma
