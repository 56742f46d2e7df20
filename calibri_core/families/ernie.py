"""ERNIE-Image (``comfy.ldm.ernie``, ComfyUI >= 0.20; not in 0.3.75).

One ``adaLN_modulation`` of the model makes (shift, scale, gate) × 2 once, and every layer reads the same six
chunks, so no module outputs one layer's gate: the engine multiplies each layer's ``self_attention`` and ``mlp``
outputs, the gate scaled where it meets its branch.
"""

from ..sites import Gate
from .table import Family, stream_gates

BRANCHES = {"attn": ("self_attention", 0, 1), "mlp": ("mlp", 0, 1)}  # whole branch outputs


def read_counts(dm) -> dict:
    return {"layers": len(dm.layers)}


def gates(counts: dict) -> list[Gate]:
    return [g for i in range(counts["layers"]) for g in stream_gates(f"layers.{i}", {"": ""}, BRANCHES)]


FAMILY = Family(
    name="ernie_image",
    title="ERNIE-Image",
    classes=("comfy.ldm.ernie.model.ErnieImageModel",),
    read_counts=read_counts,
    gates=gates,
)
