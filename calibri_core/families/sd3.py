"""SD3 / SD3.5 Medium and Large (``comfy.ldm.modules.diffusionmodules.mmdit``).

Each joint block has an ``x_block`` (image) and a ``context_block`` (text), each with its own adaLN
Linear whose output chunks are (shift, scale, gate) × 2; MMDiT-X dual-attention x_blocks append a
third triple for the second attention (gate_msa2). The last context_block is ``pre_only``: it emits
only shift and scale and has no gate, so it has no sites. Site order is the model's block order;
the reference's flat-vector order is a separate layout (see ``calibri_core.layouts``).
"""

from ..sites import Gate
from .table import Family, KnownModel

MODULATION = "adaLN_modulation.1"


def read_counts(dm) -> dict:
    blocks = dm.joint_blocks
    return {
        "joint_blocks": len(blocks),
        "dual_attention_blocks": [i for i, b in enumerate(blocks) if b.x_block.x_block_self_attn],
        "context_pre_only_blocks": [i for i, b in enumerate(blocks) if b.context_block.pre_only],
        "scale_mod_only": bool(blocks[0].x_block.scale_mod_only),
    }


def _stream_gates(block: str, stream: str, module: str, *, dual: bool, scale_mod_only: bool) -> list[Gate]:
    # Chunk layouts of DismantledBlock.adaLN_modulation: 6 = (shift, scale, gate) x 2,
    # 9 adds (shift2, scale2, gate2) for attn2, 4 = (scale, gate) x 2 without shifts.
    if scale_mod_only:
        chunks = {"attn": 1, "mlp": 3}, 4
    elif dual:
        chunks = {"attn": 2, "mlp": 5, "attn2": 8}, 9
    else:
        chunks = {"attn": 2, "mlp": 5}, 6
    positions, total = chunks
    return [Gate(block, stream, branch, f"{block}.{module}.{MODULATION}", chunk, total)
            for branch, chunk in positions.items()]


def gates(counts: dict) -> list[Gate]:
    result = []
    dual, pre_only = set(counts["dual_attention_blocks"]), set(counts["context_pre_only_blocks"])
    for i in range(counts["joint_blocks"]):
        block = f"joint_blocks.{i}"
        result += _stream_gates(block, "x", "x_block", dual=i in dual,
                                scale_mod_only=counts["scale_mod_only"])
        if i not in pre_only:
            result += _stream_gates(block, "context", "context_block", dual=False,
                                    scale_mod_only=counts["scale_mod_only"])
    return result


FAMILY = Family(
    name="sd3",
    title="SD3 / SD3.5 Medium / SD3.5 Large",
    classes=("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "joint_blocks"},
    ungated="the last context_block is pre_only: it has no gates and its text output is discarded",
    cfg=7.0,
    search_cfg=7.0,  # src/models/*_sg.py (SD3.5 pipeline): cfg_scale = 7.0, never overridden in training
    search_granularity="gate",  # the reference's SD3.5 pipeline scales gates only
    clip_type="SD3",
    models={
        # Medium is MMDiT-X: dual attention in its first 13 blocks.
        "sd3.5-medium": KnownModel("SD3.5 Medium", {"joint_blocks": 24, "dual_attention_blocks": list(range(13)),
                                                    "context_pre_only_blocks": [23], "scale_mod_only": False}),
        "sd3.5-large": KnownModel("SD3.5 Large", {"joint_blocks": 38, "dual_attention_blocks": [],
                                                  "context_pre_only_blocks": [37], "scale_mod_only": False}),
    },
)
