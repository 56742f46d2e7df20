"""Flux.1 dev / schnell / Kontext (``comfy.ldm.flux``).

Every block owns its modulation Linear, whose output is (shift, scale, gate) × 2 for double blocks
and × 1 for single blocks. The engine multiplies the gate chunks of that output, which equals the
reference's scaling of diffusers' ``norm1`` / ``norm1_context`` gate outputs. A single block has one
gate over its fused attention+MLP output, so it is one site at every granularity.

LongCat-Image and Ovis-Image (ComfyUI >= 0.3.76) are built from the same class with the same per-block
modulation and gates, but are other models: each is its own family, so a FLUX.1 preset is never applied to
them. ComfyUI tells them apart by their params alone (comfy/model_detection.py), and so do we.
"""

from ..sites import Gate
from .table import Family, KnownModel, dynamic_shift, fixed_shift, stream_gates

DOUBLE_BRANCHES = {"attn": ("{stream}_mod.lin", 2, 6), "mlp": ("{stream}_mod.lin", 5, 6)}
STREAMS = {"img": "img", "txt": "txt"}


def read_counts(dm) -> dict:
    return {"double_blocks": len(dm.double_blocks), "single_blocks": len(dm.single_blocks)}


def gates(counts: dict) -> list[Gate]:
    double = [g for i in range(counts["double_blocks"])
              for g in stream_gates(f"double_blocks.{i}", STREAMS, DOUBLE_BRANCHES)]
    single = [Gate(f"single_blocks.{i}", "", "", f"single_blocks.{i}.modulation.lin", 2, 3)
              for i in range(counts["single_blocks"])]
    return double + single


def _param(dm, name: str):
    return getattr(getattr(dm, "params", None), name, None)


def _is_ovis(dm) -> bool:  # a gated (SwiGLU) MLP and a text norm: Ovis-Image's markers
    return bool(_param(dm, "yak_mlp")) and bool(_param(dm, "txt_norm"))


def _is_longcat(dm) -> bool:  # Qwen2.5-VL text features (3584 wide) and no pooled vector
    return _param(dm, "context_in_dim") == 3584 and _param(dm, "vec_in_dim") is None and not _is_ovis(dm)


def _per_block_modulation(dm) -> bool:  # Flux.2 shares one modulation layer instead
    return not hasattr(dm, "double_stream_modulation_img")


_CLASSES = ("comfy.ldm.flux.model.Flux",)
_DIT_BLOCKS = {"double_block": "double_blocks", "single_block": "single_blocks"}

FAMILY = Family(
    name="flux",
    title="Flux.1 dev/schnell/Kontext",
    classes=_CLASSES,
    accepts=lambda dm: _per_block_modulation(dm) and not _is_ovis(dm) and not _is_longcat(dm),
    read_counts=read_counts,
    gates=gates,
    dit_blocks=_DIT_BLOCKS,
    guidance=3.5,
    # The reference samples with diffusers' FluxPipeline: FLUX.1-dev's scheduler config has use_dynamic_shifting,
    # base_shift 0.5 / max_shift 1.15 over 256..4096 image tokens (ComfyUI's ModelSamplingFlux defaults too).
    schedule=dynamic_shift(0.5, 1.15, 256, 4096, "FLUX.1-dev scheduler_config.json (diffusers FluxPipeline)"),
    search_granularity="layer",  # the reference README's quick start: configs/cmaes_hpsv3_flux_layer
    clip_type="FLUX",
    models={"flux1-dev": KnownModel("FLUX.1-dev", {"double_blocks": 19, "single_blocks": 38})},
)
LONGCAT_IMAGE = Family(name="longcat_image", title="LongCat-Image", classes=_CLASSES,
                       accepts=lambda dm: _per_block_modulation(dm) and _is_longcat(dm),
                       read_counts=read_counts, gates=gates, dit_blocks=_DIT_BLOCKS, clip_type="LONGCAT_IMAGE",
                       cfg=4.0, guidance=4.0)  # image_longcat_text_to_image.json: KSampler cfg 4, FluxGuidance 4
OVIS_IMAGE = Family(name="ovis_image", title="Ovis-Image", classes=_CLASSES,
                    accepts=lambda dm: _per_block_modulation(dm) and _is_ovis(dm),
                    read_counts=read_counts, gates=gates, dit_blocks=_DIT_BLOCKS, clip_type="OVIS",
                    cfg=5.0,  # image_ovis_text_to_image.json: KSampler cfg 5, ModelSamplingAuraFlow 3
                    schedule=fixed_shift("ModelSamplingAuraFlow", 3.0, "image_ovis_text_to_image.json"))
