"""AuraFlow (``comfy.ldm.aura.mmdit``).

Its ``double_layers`` (``MMDiTBlock``) own ``modX`` and ``modC`` (SiLU, Linear → 6 chunks: shift, scale, gate for
attention, then for the MLP) for the image (x) and text (c) streams; its ``single_layers`` (``DiTBlock``) own
``modCX`` over the joined tokens. Gates are chunks 2 and 5 everywhere. AuraFlow applies the attention gate inside a
post-norm (``normX2(x + gate·attn)``) and the MLP gate on the residual; scaling the chunk scales the gate wherever
the block uses it, which is the paper's operation on this block. A double layer built ``is_last`` (a model with no
single layers) has no text gates; no released AuraFlow has one, and ComfyUI's forward could not run it.
"""

from ..sites import Gate
from .table import Family, stream_gates

BRANCHES = {"attn": ("mod{stream}.1", 2, 6), "mlp": ("mod{stream}.1", 5, 6)}


def read_counts(dm) -> dict:
    return {"double_layers": len(dm.double_layers), "single_layers": len(dm.single_layers)}


def gates(counts: dict) -> list[Gate]:
    double = [g for i in range(counts["double_layers"])
              for g in stream_gates(f"double_layers.{i}", {"x": "X", "c": "C"}, BRANCHES)]
    single = [g for i in range(counts["single_layers"])
              for g in stream_gates(f"single_layers.{i}", {"": "CX"}, BRANCHES)]
    return double + single


FAMILY = Family(
    name="auraflow",
    title="AuraFlow",
    classes=("comfy.ldm.aura.mmdit.MMDiT",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "double_layers", "single_block": "single_layers"},
    clip_type="STABLE_DIFFUSION",  # ComfyUI's load_clip recognises AuraFlow's Pile-T5 by its weights, whatever the type
)
