"""Mage-Flow (``comfy.ldm.mage_flow``, ComfyUI >= 0.20): Qwen-Image's own blocks, 12 of them.

``MageFlowTransformer2DModel`` builds its ``transformer_blocks`` from ``QwenImageTransformerBlock``, so the gates are
Qwen-Image's: chunks 2 and 5 of ``img_mod.1`` / ``txt_mod.1``. It never passes ``timestep_zero_index`` (reference
images are appended as tokens under the same timestep), so every modulation row is one sample's. As in Qwen-Image,
only the image tokens reach ``proj_out``: the last block's two text gates are computed and thrown away.
"""

from .qwen_image import BRANCHES, gates, read_counts
from .table import Family


def last_block_text(counts: dict) -> tuple[str, ...]:
    """The last block's text gates (Qwen-Image's block layout): its text stream feeds nothing the model returns."""
    return tuple(f"transformer_blocks.{counts['transformer_blocks'] - 1}.txt.{branch}" for branch in BRANCHES)

FAMILY = Family(
    name="mage_flow",
    title="Mage-Flow",
    classes=("comfy.ldm.mage_flow.model.MageFlowTransformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "transformer_blocks"},
    discarded=last_block_text,
    clip_type="MAGE",
    cfg=5.0,  # ComfyUI's template image_mage_flow_t2i_int8.json: KSampler cfg 5, no sampling node (the model's shift 6)
)
