"""Kandinsky 5 video (Lite / Pro) and Kandinsky 5 image (``comfy.ldm.kandinsky5``; one class, two families).

Text blocks (``text_transformer_blocks``) own ``text_modulation.out_layer`` (Linear → 6 chunks: shift, scale, gate for
self-attention, then for the FFN): gates 2 and 5. Visual blocks (``visual_transformer_blocks``) own
``visual_modulation.out_layer`` (9 chunks: self-attention, cross-attention, FFN): gates 2, 5 and 8; the
cross-attention to the text is gated like the other two. The text blocks' output is the context of every visual
block's cross-attention, so their gates act through it.

The image model is told apart as ComfyUI's ``Kandinsky5Image`` config does: a 64-wide visual embedding (16 latent
channels × the 2×2 patch, no concatenated image and mask).
"""

from ..sites import Gate
from .table import Family, fixed_shift, stream_gates

TEXT_BRANCHES = {"attn": ("text_modulation.out_layer", 2, 6), "mlp": ("text_modulation.out_layer", 5, 6)}
VISUAL_BRANCHES = {"attn": ("visual_modulation.out_layer", 2, 9), "cross_attn": ("visual_modulation.out_layer", 5, 9),
                   "mlp": ("visual_modulation.out_layer", 8, 9)}
IMAGE_VISUAL_EMBED = 64


def read_counts(dm) -> dict:
    return {"text_transformer_blocks": len(dm.text_transformer_blocks),
            "visual_transformer_blocks": len(dm.visual_transformer_blocks)}


def gates(counts: dict) -> list[Gate]:
    text = [g for i in range(counts["text_transformer_blocks"])
            for g in stream_gates(f"text_transformer_blocks.{i}", {"": ""}, TEXT_BRANCHES)]
    visual = [g for i in range(counts["visual_transformer_blocks"])
              for g in stream_gates(f"visual_transformer_blocks.{i}", {"": ""}, VISUAL_BRANCHES)]
    return text + visual


def _is_image(dm) -> bool:
    return dm.visual_embed_dim == IMAGE_VISUAL_EMBED


_CLASSES = ("comfy.ldm.kandinsky5.model.Kandinsky5",)
_DIT_BLOCKS = {"double_block": "visual_transformer_blocks"}  # the text blocks ignore patches_replace

KANDINSKY5 = Family(name="kandinsky5", title="Kandinsky 5 video (Lite / Pro)", classes=_CLASSES,
                    accepts=lambda dm: not _is_image(dm), read_counts=read_counts, gates=gates,
                    dit_blocks=_DIT_BLOCKS, clip_type="KANDINSKY5",
                    cfg=5.0,  # ComfyUI's template video_kandinsky5_t2v.json: KSampler cfg 5, ModelSamplingSD3 5
                    schedule=fixed_shift("ModelSamplingSD3", 5.0, "video_kandinsky5_t2v.json"))
KANDINSKY5_IMAGE = Family(name="kandinsky5_image", title="Kandinsky 5 image", classes=_CLASSES, accepts=_is_image,
                          read_counts=read_counts, gates=gates, dit_blocks=_DIT_BLOCKS, clip_type="KANDINSKY5_IMAGE",
                          cfg=3.5,  # ComfyUI's template image_kandinsky5_t2i.json: KSampler cfg 3.5, ModelSamplingSD3 3
                          schedule=fixed_shift("ModelSamplingSD3", 3.0, "image_kandinsky5_t2i.json"))
