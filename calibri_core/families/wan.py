"""Wan 2.1 / 2.2 (``comfy.ldm.wan``; T2V, I2V, VACE, camera, S2V variants share the blocks).

The gate of block i is ``blocks.i.modulation[k] + e0[k]``, where ``e0`` comes from one time projection
shared by all blocks and is per token when the timestep is per frame (Wan 2.2). The engine multiplies
each block's self-attention and FFN outputs, which scales the whole gate where it meets its branch,
per-token modulation included. Cross-attention is added ungated (``x + cross_attn(...)``) and is
left untouched.
"""

from ..sites import Gate
from .table import Family

BRANCHES = {"attn": "self_attn", "mlp": "ffn"}


def read_counts(dm) -> dict:
    return {"blocks": len(dm.blocks)}


def gates(counts: dict) -> list[Gate]:
    return [Gate(f"blocks.{i}", "", branch, f"blocks.{i}.{module}")
            for i in range(counts["blocks"]) for branch, module in BRANCHES.items()]


FAMILY = Family(
    name="wan",
    title="Wan 2.1 / 2.2",
    classes=("comfy.ldm.wan.model.WanModel",),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "blocks"},
    ungated="cross-attention is added without a gate and is never scaled",
)
