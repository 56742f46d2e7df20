"""LTX-Video and LTX-2.x audio-video (``comfy.ldm.lightricks``).

Every block takes its adaLN chunks from one ``adaln_single`` projection shared by all blocks, offset by the block's
own ``scale_shift_table`` (shift, scale, gate for self-attention then for the FF; with ``cross_attention_adaln``,
LTX-2.3, a third triple gates the text cross-attention's query). No module outputs a block's gate alone, so the
engine multiplies the branch outputs the gates multiply: ``attn1`` and ``ff``, and ``attn2`` where it is gated.

LTX-2 (``LTXAVModel``) runs a video and an audio stream through each block; the sites name the modality
(``transformer_blocks.3.video.attn1`` / ``.audio.attn1``, both ``transformer_blocks.3.attn1`` at layer granularity).
Besides each stream's own self-attention, text cross-attention and FF (``audio_attn1`` / ``audio_attn2`` /
``audio_ff`` for audio), the gated cross-modal attentions add to one stream each: ``audio_to_video_attn`` to the
video, ``video_to_audio_attn`` to the audio. Without ``cross_attention_adaln`` the text cross-attention is added
ungated and is never scaled. A video-only LTX-2 run (an empty audio latent) skips the audio and cross-modal
branches, so their sites act only when audio is generated.
"""

from ..sites import Gate
from .table import Family, stream_gates

VIDEO_BRANCHES = {"attn1": ("attn1", 0, 1), "ff": ("ff", 0, 1)}
GATED_CROSS_ATTENTION = {"attn2": ("attn2", 0, 1)}
# per stream of LTXAVModel's blocks: branch → module, whose names carry the modality in ComfyUI
AV_BRANCHES = {
    "video": {"attn1": "attn1", "attn2": "attn2", "audio_to_video_attn": "audio_to_video_attn", "ff": "ff"},
    "audio": {"attn1": "audio_attn1", "attn2": "audio_attn2", "video_to_audio_attn": "video_to_audio_attn",
              "ff": "audio_ff"},
}
_UNGATED = ("without cross_attention_adaln (LTX-Video, LTX-2 before 2.3) the text cross-attention (attn2) is added "
            "ungated and is never scaled")


def read_counts(dm) -> dict:
    return {"transformer_blocks": len(dm.transformer_blocks),
            "cross_attention_adaln": bool(getattr(dm, "cross_attention_adaln", False))}


def video_gates(counts: dict) -> list[Gate]:
    branches = dict(VIDEO_BRANCHES)
    if counts["cross_attention_adaln"]:
        branches = {"attn1": branches["attn1"], **GATED_CROSS_ATTENTION, "ff": branches["ff"]}
    return [g for i in range(counts["transformer_blocks"])
            for g in stream_gates(f"transformer_blocks.{i}", {"": ""}, branches)]


def audio_video_gates(counts: dict) -> list[Gate]:
    result = []
    for i in range(counts["transformer_blocks"]):
        block = f"transformer_blocks.{i}"
        for stream, branches in AV_BRANCHES.items():
            result += [Gate(block, stream, branch, f"{block}.{module}") for branch, module in branches.items()
                       if branch != "attn2" or counts["cross_attention_adaln"]]
    return result


# The blocks honour patches_replace["dit"] ("double_block"), but a block with its gates at 0 keeps the ungated text
# cross-attention (without cross_attention_adaln): SLG is not re-expressed as a calibration (not_a_block_skip).
_NOT_A_BLOCK_SKIP = "without cross_attention_adaln its text cross-attention (attn2) stays when the gates are 0"

LTXV = Family(
    name="ltxv",
    title="LTX-Video",
    classes=("comfy.ldm.lightricks.model.LTXVModel",),
    read_counts=read_counts,
    gates=video_gates,
    ungated=_UNGATED,
    dit_blocks={"double_block": "transformer_blocks"},
    not_a_block_skip=_NOT_A_BLOCK_SKIP,
    clip_type="LTXV",
)
LTXAV = Family(
    name="ltxav",
    title="LTX-2 / LTX-2.x audio-video",
    classes=("comfy.ldm.lightricks.av_model.LTXAVModel",),
    read_counts=read_counts,
    gates=audio_video_gates,
    audio_video=True,
    ungated=_UNGATED,
    dit_blocks={"double_block": "transformer_blocks"},
    not_a_block_skip=_NOT_A_BLOCK_SKIP,
    clip_type="LTXV",
)
