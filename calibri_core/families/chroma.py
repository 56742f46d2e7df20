"""Chroma and Chroma Radiance (``comfy.ldm.chroma``).

Gates are slices of one shared approximator output (``distilled_guidance_layer``), handed to Flux
blocks that have no modulation of their own; as for Flux.2, each block's branch output is scaled.
"""

from .flux2 import branch_gates, read_counts
from .table import Family, fixed_shift

FAMILY = Family(
    name="chroma",
    title="Chroma / Chroma Radiance",
    classes=("comfy.ldm.chroma.model.Chroma", "comfy.ldm.chroma_radiance.model.ChromaRadiance"),
    read_counts=read_counts,
    gates=branch_gates,
    dit_blocks={"double_block": "double_blocks", "single_block": "single_blocks"},
    clip_type="CHROMA",
    cfg=3.5,  # ComfyUI's template image_chroma_text_to_image.json: CFGGuider 3.5, ModelSamplingAuraFlow 1
    schedule=fixed_shift("ModelSamplingAuraFlow", 1.0, "image_chroma_text_to_image.json"),
)
