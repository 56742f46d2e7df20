"""MiniMax H3 audio-video (``comfy.ldm.minimax``, ComfyUI >= 0.30; not in 0.3.75).

One single-stream sequence packs text, condition / reference rows, audio and video tokens without a batch dimension.
Each block's ``adaln_proj.linear`` maps the few distinct timestep embeddings of the sequence to 18 chunks: 6
(shift, scale, gate for attention, then for the MLP) for each of 3 modality rows, video, text and audio in that
order, so the gates are chunks 2 and 5 (video), 8 and 11 (text), 14 and 17 (audio). Every token reads its
modality's row (vision pads inside the text span read the video row), so the engine multiplies those chunks of the
Linear output, per modality; the sites name it (``blocks.7.audio.attn``). The token refiner and the final layer
are ungated. The last block's text gates are inert (its text tokens feed nothing the model returns); they stay
in the layout so that every block has the same sites.

The model refuses a batch of more than one sample ("MiniMax H3 supports batch size 1"), and ComfyUI never batches
its conds (each carries its own packed layout): one forward is one sample, so one row of scales, and an ensemble
runs its members one forward each (``single_sample_forward``).
"""

from ..sites import Gate
from .table import Family, KnownModel

MODALITIES = ("video", "text", "audio")  # the order of the three 6-chunk rows of adaln_proj.linear's output
BRANCHES = {"attn": 2, "mlp": 5}


def read_counts(dm) -> dict:
    return {"blocks": len(dm.blocks)}


def gates(counts: dict) -> list[Gate]:
    return [Gate(f"blocks.{i}", stream, branch, f"blocks.{i}.adaln_proj.linear", 6 * row + chunk, 6 * len(MODALITIES))
            for i in range(counts["blocks"]) for row, stream in enumerate(MODALITIES)
            for branch, chunk in BRANCHES.items()]


FAMILY = Family(
    name="minimax_h3",
    title="MiniMax H3 audio-video",
    classes=("comfy.ldm.minimax.model.MiniMaxH3Model",),
    read_counts=read_counts,
    gates=gates,
    ungated="the token refiner's blocks add their branches without a gate and are never scaled",
    single_sample_forward=True,
    audio_video=True,
    # the final layer reads only the audio and video tokens: the last block's text output is thrown away
    discarded=lambda counts: tuple(f"blocks.{counts['blocks'] - 1}.text.{branch}" for branch in BRANCHES),
    clip_type="MINIMAX",
    # MiniMaxH3Model's default depth (num_layers=50); comfy/model_detection.py counts blocks.N of the checkpoint
    models={"minimax-h3": KnownModel("MiniMax H3", {"blocks": 50})},
)
