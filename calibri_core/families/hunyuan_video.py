"""HunyuanVideo, HunyuanVideo 1.5 and HunyuanImage 2.1 (``comfy.ldm.hunyuan_video``; one class, three families).

The blocks are Flux's own ``DoubleStreamBlock`` / ``SingleStreamBlock`` with per-block modulation, so their gates are
the flux table's (chunks 2 and 5 of ``img_mod.lin`` / ``txt_mod.lin``, chunk 2 of 3 of ``modulation.lin``). Before
them the text passes the token refiner's blocks (``txt_in.individual_token_refiner.blocks``), whose adaLN is
gate-only: ``adaLN_modulation.1`` gives (attention gate, MLP gate), chunks 0 and 1 of 2. The I2V guiding frame
(``guiding_frame_index``) modulates the first frame's tokens with a second vector; the gate chunk of both is scaled.

The three models share the class and are told apart as ComfyUI's model configs do (comfy/supported_models.py):
HunyuanVideo 1.5 has a vision projection (``vision_in_dim``), HunyuanImage 2.1 (and its refiner) no pooled CLIP
vector (``vec_in_dim`` None), HunyuanVideo 1.0 (T2V, I2V, SkyReels I2V) both. Where a model has no single-stream
blocks (HunyuanVideo 1.5), the text tokens leaving the last double block are dropped: its two text gates are inert.
"""

from ..sites import Gate
from . import flux
from .table import Family, fixed_shift, stream_gates

REFINER = "txt_in.individual_token_refiner.blocks"
REFINER_BRANCHES = {"attn": ("adaLN_modulation.1", 0, 2), "mlp": ("adaLN_modulation.1", 1, 2)}


def read_counts(dm) -> dict:
    return {"token_refiner_blocks": len(dm.txt_in.individual_token_refiner.blocks), **flux.read_counts(dm)}


def gates(counts: dict) -> list[Gate]:
    refiner = [g for i in range(counts["token_refiner_blocks"])
               for g in stream_gates(f"{REFINER}.{i}", {"": ""}, REFINER_BRANCHES)]
    return refiner + flux.gates(counts)


def discarded(counts: dict) -> tuple[str, ...]:
    if counts["single_blocks"] or not counts["double_blocks"]:
        return ()
    return tuple(f"double_blocks.{counts['double_blocks'] - 1}.txt.{branch}" for branch in flux.DOUBLE_BRANCHES)


def _generation(dm) -> str:
    if dm.params.vision_in_dim is not None:
        return "1.5"
    return "1.0" if dm.params.vec_in_dim is not None else "image2.1"


_CLASSES = ("comfy.ldm.hunyuan_video.model.HunyuanVideo",)
_DIT_BLOCKS = {"double_block": "double_blocks", "single_block": "single_blocks"}


def _family(name: str, title: str, generation: str, clip_type: str, **defaults) -> Family:
    return Family(name=name, title=title, classes=_CLASSES, accepts=lambda dm: _generation(dm) == generation,
                  read_counts=read_counts, gates=gates, discarded=discarded, dit_blocks=_DIT_BLOCKS,
                  clip_type=clip_type, **defaults)


# Sampling defaults from ComfyUI's workflow templates: hunyuan_video_text_to_video.json (BasicGuider, FluxGuidance 6,
# ModelSamplingSD3 7); video_hunyuan_video_1.5_720p_t2v.json (first pass: CFGGuider 6, ModelSamplingSD3 7). No
# template ships HunyuanImage 2.1.
HUNYUAN_VIDEO = _family("hunyuan_video", "HunyuanVideo (T2V / I2V / SkyReels)", "1.0", "HUNYUAN_VIDEO", guidance=6.0,
                        schedule=fixed_shift("ModelSamplingSD3", 7.0, "hunyuan_video_text_to_video.json"))
HUNYUAN_VIDEO_15 = _family("hunyuan_video15", "HunyuanVideo 1.5", "1.5", "HUNYUAN_VIDEO_15", cfg=6.0,
                           schedule=fixed_shift("ModelSamplingSD3", 7.0, "video_hunyuan_video_1.5_720p_t2v.json"))
HUNYUAN_IMAGE_21 = _family("hunyuan_image21", "HunyuanImage 2.1 (and refiner)", "image2.1", "HUNYUAN_IMAGE")
