"""Tiny specs of the issue-11 families (part 2), merged into tiny_models.SPECS before its FAMILIES.

Imported by tiny_models once TinySpec exists there; each spec's model class is on ComfyUI 0.33.0 (specs whose class a
host lacks skip there with the reason, like every spec).
"""

from __future__ import annotations

from tiny_models import TinySpec

LTXV_CLASS = "comfy.ldm.lightricks.model.LTXVModel"
_LTXV_TINY = dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=16,
                  num_attention_heads=4, caption_channels=32, num_layers=2)

SPECS_PART2 = {
    "ltxv": TinySpec("LTXV", _LTXV_TINY, (128, 2, 4, 4), (5, 32), text_mask=True),
    # LTX-2.3's gated text cross-attention (ComfyUI >= 0.4: cross_attention_adaln from the checkpoint's config)
    "ltxv_adaln": TinySpec("LTXV", dict(_LTXV_TINY, cross_attention_adaln=True), (128, 2, 4, 4), (5, 32),
                           text_mask=True, family="ltxv", needs=(LTXV_CLASS, "cross_attention_adaln")),
    # txtdim 16 x txtlayers 2: the context is the 2-layer Qwen3-VL stack flattened per token, as Krea2's TE gives it
    "krea2": TinySpec("Krea2", dict(image_model="krea2", features=64, tdim=32, txtdim=16, heads=4, kvheads=2,
                                    multiplier=2, layers=2, patch=2, channels=16, theta=1000, txtlayers=2, txtheads=2,
                                    txtkvheads=2),
                      (16, 1, 8, 8), (5, 32)),
}
