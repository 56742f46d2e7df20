"""Ideogram 4 (``comfy.ldm.ideogram4``, ComfyUI >= 0.30; not in 0.3.75).

Single-stream blocks over the packed [text, image] sequence (image only for the unconditional pass) that add
``x + tanh(gate) · RMSNorm(branch)`` as Lumina2 does; each block's ``adaln_modulation`` Linear gives (scale, gate)
× 2 and scaling its gate chunks would scale the gate before the tanh. The engine multiplies the RMSNorm'd branch
(``attention_norm2`` / ``ffn_norm2`` outputs), the post-tanh gate where it meets its branch.
"""

from .table import Family, block_list

read_counts, gates = block_list("layers", {"attn": "attention_norm2", "mlp": "ffn_norm2"})


FAMILY = Family(
    name="ideogram4",
    title="Ideogram 4",
    classes=("comfy.ldm.ideogram4.model.Ideogram4Transformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    clip_type="IDEOGRAM4",
)
