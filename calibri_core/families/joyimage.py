"""JoyImage / JoyImage-Edit (``comfy.ldm.joyimage``, ComfyUI >= 0.30; not in 0.3.75).

Double-stream blocks (image and text) whose modulation is one time projection shared by all blocks plus each
block's ``img_mod`` / ``txt_mod`` table, returned as a list of six chunks: there is no per-block gate Linear, so the
engine multiplies the branch outputs. The joint attention returns the image and the text output together, so the
attention sites are its two output projections (``attn.img_attn_proj`` / ``attn.txt_attn_proj``); the MLP sites are
``img_mlp`` / ``txt_mlp``. The last block's text output is thrown away (only image tokens reach the output), so its
two text gates are inert alone; they stay in the layout so that every block has the same sites.
"""

from ..sites import Gate
from .table import Family, stream_gates

BRANCHES = {"attn": ("attn.{stream}_attn_proj", 0, 1), "mlp": ("{stream}_mlp", 0, 1)}
STREAMS = {"img": "img", "txt": "txt"}


def read_counts(dm) -> dict:
    return {"double_blocks": len(dm.double_blocks)}


def gates(counts: dict) -> list[Gate]:
    return [g for i in range(counts["double_blocks"]) for g in stream_gates(f"double_blocks.{i}", STREAMS, BRANCHES)]


FAMILY = Family(
    name="joyimage",
    title="JoyImage",
    classes=("comfy.ldm.joyimage.model.JoyImageTransformer3DModel",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "double_blocks"},
    discarded=lambda counts: tuple(f"double_blocks.{counts['double_blocks'] - 1}.txt.{branch}" for branch in BRANCHES),
    clip_type="JOYIMAGE",
)
