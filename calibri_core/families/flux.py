"""Flux.1 dev / schnell / Kontext (``comfy.ldm.flux``).

Every block owns its modulation Linear, whose output is (shift, scale, gate) × 2 for double blocks
and × 1 for single blocks. The engine multiplies the gate chunks of that output, which equals the
reference's scaling of diffusers' ``norm1`` / ``norm1_context`` gate outputs. A single block has one
gate over its fused attention+MLP output, so it is one site at every granularity.
"""

from ..sites import Gate
from .table import Family, stream_gates

DOUBLE_BRANCHES = {"attn": ("{stream}_mod.lin", 2, 6), "mlp": ("{stream}_mod.lin", 5, 6)}
STREAMS = {"img": "img", "txt": "txt"}


def read_counts(dm) -> dict:
    return {"double_blocks": len(dm.double_blocks), "single_blocks": len(dm.single_blocks)}


def gates(counts: dict) -> list[Gate]:
    double = [g for i in range(counts["double_blocks"])
              for g in stream_gates(f"double_blocks.{i}", STREAMS, DOUBLE_BRANCHES)]
    single = [Gate(f"single_blocks.{i}", "", "", f"single_blocks.{i}.modulation.lin", 2, 3)
              for i in range(counts["single_blocks"])]
    return double + single


FAMILY = Family(
    name="flux",
    title="Flux.1 dev/schnell/Kontext",
    classes=("comfy.ldm.flux.model.Flux",),
    accepts=lambda dm: not hasattr(dm, "double_stream_modulation_img"),
    read_counts=read_counts,
    gates=gates,
    dit_blocks={"double_block": "double_blocks", "single_block": "single_blocks"},
)
