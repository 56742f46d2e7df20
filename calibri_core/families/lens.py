"""Microsoft Lens (``comfy.ldm.lens``, ComfyUI >= 0.20): a dual-stream MMDiT with Qwen-Image's modulation layout.

``LensTransformerBlock`` has ``img_mod`` and ``txt_mod`` (SiLU, Linear D→6D) whose chunks are (shift, scale, gate)
for the joint attention, then for the SwiGLU MLP: gates are chunks 2 and 5, as in Qwen-Image. Only the image tokens
reach ``norm_out``, so the last block's two text gates are computed and thrown away.
"""

from .mage_flow import last_block_text
from .qwen_image import gates, read_counts
from .table import Family

FAMILY = Family(
    name="lens",
    title="Lens",
    classes=("comfy.ldm.lens.model.LensTransformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "transformer_blocks"},
    discarded=last_block_text,
    clip_type="LENS",
    # ComfyUI's template image_lens_t2i.json: SamplerCustom cfg 5 (after a CFGNorm patch the search does not add). Its
    # ModelSamplingFlux is fed a token-count-equivalent width, so the model's own shift (1.829, Lens's mu at 1440²)
    # is kept rather than the node at the search's image size.
    cfg=5.0,
)
