"""Wan 2.1 / 2.2 (``comfy.ldm.wan``; T2V, I2V, VACE, camera, S2V, HuMo, Animate, Animate 2, SCAIL, WanDancer,
causal AR variants share the blocks).

The gate of block i is ``blocks.i.modulation[k] + e0[k]``, where ``e0`` comes from one time projection
shared by all blocks and is per token when the timestep is per frame (Wan 2.2). The engine multiplies
the output of each block's self-attention output projection (``self_attn.o``) and of its FFN, which
scales the whole gate where it meets its branch (``x + branch·gate``), per-token modulation included.
``self_attn.o`` rather than ``self_attn``: Wan Animate 2's blocks run their self-attention through
``forward_pose`` / ``forward_gen``, never ``forward``, and every path ends in ``o``. Its pose branch runs
the same blocks, so its gates are scaled alike. Cross-attention (and the audio / face / music injectors
of some variants) is added ungated and is left untouched.

Only the model classes below have been checked block by block (tests/test_wan_variants.py); detection
refuses any other subclass of WanModel by name.
"""

from ..sites import Gate
from .table import Family, fixed_shift

BRANCHES = {"attn": "self_attn.o", "mlp": "ffn"}

VERIFIED = frozenset({
    "comfy.ldm.wan.model.WanModel",
    "comfy.ldm.wan.model.VaceWanModel",
    "comfy.ldm.wan.model.CameraWanModel",
    "comfy.ldm.wan.model.WanModel_S2V",
    "comfy.ldm.wan.model.HumoWanModel",
    "comfy.ldm.wan.model.SCAILWanModel",
    "comfy.ldm.wan.model.SCAIL2WanModel",
    "comfy.ldm.wan.model_animate.AnimateWanModel",
    "comfy.ldm.wan.model_animate2.WanAnimate2Model",
    "comfy.ldm.wan.model_wandancer.WanDancerModel",
    "comfy.ldm.wan.ar_model.CausalWanModel",
})
"""Wan model classes whose blocks add exactly ``self_attn.o(...)·gate`` and ``ffn(...)·gate`` to the residual."""


def read_counts(dm) -> dict:
    return {"blocks": len(dm.blocks)}


def gates(counts: dict) -> list[Gate]:
    return [Gate(f"blocks.{i}", "", branch, f"blocks.{i}.{module}")
            for i in range(counts["blocks"]) for branch, module in BRANCHES.items()]


FAMILY = Family(
    name="wan",
    title="Wan 2.1 / 2.2",
    classes=VERIFIED,
    read_counts=read_counts,
    gates=gates,
    row_caches=("animate2_cache",),  # WanAnimate2Cache: the pose branch from row 0 at the first step, reused
    dit_blocks={"double_block": "blocks"},
    not_a_block_skip="its cross-attention adds to the residual without a gate, so it stays when the gates are 0",
    ungated="cross-attention is added without a gate and is never scaled",
    clip_type="WAN",
    cfg=6.0,  # ComfyUI's template text_to_video_wan.json (Wan 2.1 T2V 1.3B): KSampler cfg 6, ModelSamplingSD3 8
    schedule=fixed_shift("ModelSamplingSD3", 8.0, "text_to_video_wan.json"),
)
