"""Ideogram 4 (``comfy.ldm.ideogram4``, ComfyUI >= 0.30; not in 0.3.75).

Single-stream blocks over the packed [text, image] sequence (image only for the unconditional pass) that add
``x + tanh(gate) · RMSNorm(branch)`` as Lumina2 does; each block's ``adaln_modulation`` Linear gives (scale, gate)
× 2 and scaling its gate chunks would scale the gate before the tanh. The engine multiplies the RMSNorm'd branch
(``attention_norm2`` / ``ffn_norm2`` outputs), the post-tanh gate where it meets its branch.
"""

from ..sites import Gate
from .table import Family, stream_gates

BRANCHES = {"attn": ("attention_norm2", 0, 1), "mlp": ("ffn_norm2", 0, 1)}


def read_counts(dm) -> dict:
    return {"layers": len(dm.layers)}


def gates(counts: dict) -> list[Gate]:
    return [g for i in range(counts["layers"]) for g in stream_gates(f"layers.{i}", {"": ""}, BRANCHES)]


FAMILY = Family(
    name="ideogram4",
    title="Ideogram 4",
    classes=("comfy.ldm.ideogram4.model.Ideogram4Transformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    clip_type="IDEOGRAM4",
)
