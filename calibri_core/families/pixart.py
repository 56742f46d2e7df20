"""PixArt-α and PixArt-Σ (``comfy.ldm.pixart.pixartms``; one class, two families).

A block's gates are ``scale_shift_table[k] + t0[k]`` (k = 2 for self-attention, 5 for the MLP), where ``t0`` comes
from one ``t_block`` shared by all blocks: there is no per-block Linear whose output is the gate. As for Wan, the
engine multiplies each gated branch's output (``attn`` and ``mlp``), which is the gate scaled where it meets its
branch (``x + gate·branch``). The cross-attention to the text is added without a gate and is left untouched.

PixArt-α (micro-conditioned on size and aspect ratio) and PixArt-Σ are told apart as ComfyUI's detection does.
"""

from .table import Family, block_list

read_counts, gates = block_list("blocks", {"attn": "attn", "mlp": "mlp"})


_CLASSES = ("comfy.ldm.pixart.pixartms.PixArtMS",)
_UNGATED = "cross-attention is added without a gate and is never scaled"

PIXART_ALPHA = Family(name="pixart_alpha", title="PixArt-α", classes=_CLASSES,
                      accepts=lambda dm: bool(dm.micro_conditioning), read_counts=read_counts, gates=gates,
                      ungated=_UNGATED, clip_type="PIXART")
PIXART_SIGMA = Family(name="pixart_sigma", title="PixArt-Σ", classes=_CLASSES,
                      accepts=lambda dm: not dm.micro_conditioning, read_counts=read_counts, gates=gates,
                      ungated=_UNGATED, clip_type="PIXART")
