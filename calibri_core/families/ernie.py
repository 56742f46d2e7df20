"""ERNIE-Image (``comfy.ldm.ernie``, ComfyUI >= 0.20; not in 0.3.75).

One ``adaLN_modulation`` of the model makes (shift, scale, gate) × 2 once, and every layer reads the same six
chunks, so no module outputs one layer's gate: the engine multiplies each layer's ``self_attention`` and ``mlp``
outputs, the gate scaled where it meets its branch.
"""

from .table import Family, block_list

read_counts, gates = block_list("layers", {"attn": "self_attention", "mlp": "mlp"})


FAMILY = Family(
    name="ernie_image",
    title="ERNIE-Image",
    classes=("comfy.ldm.ernie.model.ErnieImageModel",),
    read_counts=read_counts,
    gates=gates,
)
