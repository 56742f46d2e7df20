"""CogVideoX 1.0 and 1.5 (``comfy.ldm.cogvideo``, ComfyUI >= 0.21; T2V, I2V and Fun inpainting share the class).

Each block owns two ``CogVideoXLayerNormZero`` (``norm1`` before the joint attention, ``norm2`` before the FFN) whose
``linear`` gives (shift, scale, gate) for the video tokens, then for the text tokens: the image gate is chunk 2 and
the text gate chunk 5 of 6. The FFN runs on the concatenated tokens token by token, so each stream's gate scales only
its own tokens. The last block's text tokens are dropped (only the video reaches ``norm_final``), so its two text
gates are inert. The model does not honour ComfyUI's ``patches_replace["dit"]``.

CogVideoX 1.5 (a temporal patch, ``patch_size_t`` 2) is its own family, as ComfyUI's detection tells it apart: its
5B model has the block count of CogVideoX-5B.
"""

from ..sites import Gate
from .table import Family

STREAM_CHUNKS = {"img": 2, "txt": 5}
BRANCH_MODULES = {"attn": "norm1.linear", "mlp": "norm2.linear"}


def read_counts(dm) -> dict:
    return {"blocks": len(dm.blocks)}


def gates(counts: dict) -> list[Gate]:
    return [Gate(f"blocks.{i}", stream, branch, f"blocks.{i}.{module}", chunk, 6)
            for i in range(counts["blocks"]) for branch, module in BRANCH_MODULES.items()
            for stream, chunk in STREAM_CHUNKS.items()]


def _last_block_text(counts: dict) -> tuple[str, ...]:
    return tuple(f"blocks.{counts['blocks'] - 1}.txt.{branch}" for branch in BRANCH_MODULES) if counts["blocks"] else ()


_CLASSES = ("comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel",)

COGVIDEOX = Family(name="cogvideox", title="CogVideoX 1.0 (2B / 5B, T2V / I2V)", classes=_CLASSES,
                   accepts=lambda dm: dm.patch_size_t is None, read_counts=read_counts, gates=gates,
                   discarded=_last_block_text, clip_type="COGVIDEOX")
COGVIDEOX_15 = Family(name="cogvideox15", title="CogVideoX 1.5 (5B, T2V / I2V, Fun)", classes=_CLASSES,
                      accepts=lambda dm: dm.patch_size_t is not None, read_counts=read_counts, gates=gates,
                      discarded=_last_block_text, clip_type="COGVIDEOX")
