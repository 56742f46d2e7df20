"""HiDream-I1 and HiDream-E1 (``comfy.ldm.hidream``; E1 is the same class with the source image concatenated).

Every block owns ``block.adaLN_modulation`` (SiLU, Linear). A double-stream block's Linear gives 12 chunks, (shift,
scale, gate) for image attention, image MoE FFN, text attention, text FFN: gates are chunks 2, 5, 8 and 11. A
single-stream block's gives 6 chunks for its (image and text) tokens: gates 2 and 5. The gate multiplies the whole
branch output, the MoE FFN's weighted expert sum included, so scaling the chunk is the paper's operation. The text
stream of every double block lives on (its refined tokens enter the next block and the single-stream blocks). The
model does not honour ComfyUI's ``patches_replace["dit"]``.
"""

from ..sites import Gate
from .table import Family, KnownModel, fixed_shift, stream_gates

MODULATION = "block.adaLN_modulation.1"
DOUBLE_GATES = {("img", "attn"): 2, ("img", "mlp"): 5, ("txt", "attn"): 8, ("txt", "mlp"): 11}
SINGLE_BRANCHES = {"attn": (MODULATION, 2, 6), "mlp": (MODULATION, 5, 6)}


def read_counts(dm) -> dict:
    return {"double_stream_blocks": len(dm.double_stream_blocks),
            "single_stream_blocks": len(dm.single_stream_blocks)}


def gates(counts: dict) -> list[Gate]:
    double = [Gate(f"double_stream_blocks.{i}", stream, branch, f"double_stream_blocks.{i}.{MODULATION}", chunk, 12)
              for i in range(counts["double_stream_blocks"]) for (stream, branch), chunk in DOUBLE_GATES.items()]
    single = [g for i in range(counts["single_stream_blocks"])
              for g in stream_gates(f"single_stream_blocks.{i}", {"": ""}, SINGLE_BRANCHES)]
    return double + single


FAMILY = Family(
    name="hidream",
    title="HiDream-I1 / E1",
    classes=("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",),
    read_counts=read_counts,
    gates=gates,
    clip_type="HIDREAM",
    # ComfyUI's template hidream_i1_full.json: KSampler cfg 5, ModelSamplingSD3 3 (the distilled Dev / Fast templates
    # sample at cfg 1, shift 6 / 3). HiDream's own model_sampling has shift 1 (supported_models sets it twice).
    cfg=5.0,
    schedule=fixed_shift("ModelSamplingSD3", 3.0, "hidream_i1_full.json"),
    # comfy/model_detection.py sets num_layers 16 and num_single_layers 32 for every HiDream checkpoint
    models={"hidream-i1": KnownModel("HiDream-I1", {"double_stream_blocks": 16, "single_stream_blocks": 32})},
)
