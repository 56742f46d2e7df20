"""Qwen-Image and Qwen-Image-Edit (``comfy.ldm.qwen_image``).

Each block has ``img_mod`` and ``txt_mod`` (SiLU, Linear D→6D); the Linear output is
(shift, scale, gate) for attention then (shift, scale, gate) for the MLP, so gates are chunks 2 and 5.
Scaling them equals the reference's scaling of ``attn`` and ``img_mlp``/``txt_mlp`` outputs.

Qwen-Image-Edit-2511 (reference method ``index_timestep_zero``, ComfyUI >= 0.3.76) runs ``img_mod`` on the
timesteps ``cat([t, 0·t])``: 2B rows, the second half modulating the reference-image tokens of the same
sample. Both halves are that sample's gates, so both take its scales (``stacked_batch_copies``).

The last block's text stream is computed and thrown away (only the image tokens reach ``proj_out``), so its two
text gates are inert on their own. They stay in the layout because the reference's vectors (4 gates per block)
have them.
"""

from ..sites import Gate
from .table import Family, KnownModel, dynamic_shift, stream_gates

BRANCHES = {"attn": ("{stream}_mod.1", 2, 6), "mlp": ("{stream}_mod.1", 5, 6)}
STREAMS = {"img": "img", "txt": "txt"}


def read_counts(dm) -> dict:
    return {"transformer_blocks": len(dm.transformer_blocks)}


def gates(counts: dict) -> list[Gate]:
    return [g for i in range(counts["transformer_blocks"])
            for g in stream_gates(f"transformer_blocks.{i}", STREAMS, BRANCHES)]


FAMILY = Family(
    name="qwen_image",
    title="Qwen-Image / Qwen-Image-Edit",
    classes=("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "transformer_blocks"},
    stacked_batch_copies=True,
    discarded=lambda counts: tuple(f"transformer_blocks.{counts['transformer_blocks'] - 1}.txt.{branch}"
                                   for branch in BRANCHES),
    cfg=4.0,  # Qwen-Image's configured guidance_scale; it only switches the reference's second pass on
    search_cfg=7.0,  # src/models/*_sg.py (Qwen-Image pipeline): cfg_scale = 7.0, never overridden in training
    search_granularity="gate",  # the reference's Qwen-Image pipeline scales gates only
    search_population=24,  # the reference's Qwen-Image config (configs/)
    search_micro_batch=1,  # the reference's Qwen-Image config (configs/)
    rescale=True,
    # Its joint attention masks text keys by attention_mask, and text RoPE positions start after the image's.
    text_padding=True,
    # The reference samples with diffusers' QwenImagePipeline: Qwen-Image's scheduler config has
    # use_dynamic_shifting, base_shift 0.5 / max_shift 0.9 over 256..8192 image tokens, exponential time shift (its
    # shift_terminal 0.02 stretch of the last sigmas has no ComfyUI node and is not reproduced).
    schedule=dynamic_shift(0.5, 0.9, 256, 8192, "Qwen-Image scheduler_config.json (diffusers QwenImagePipeline)"),
    clip_type="QWEN_IMAGE",
    models={"qwen-image": KnownModel("Qwen-Image", {"transformer_blocks": 60})},
)
