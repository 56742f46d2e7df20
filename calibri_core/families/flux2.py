"""Flux.2 (``comfy.ldm.flux`` with global modulation).

One modulation layer per stream is shared by all blocks, so the gate cannot be scaled where it is
produced. The engine multiplies each block's branch output instead: ``img + gate·(s·branch)`` is the
gate scaled by s where it meets its branch. Chroma has the same blocks and reuses these gates.
"""

from ..sites import Gate
from .flux import STREAMS, read_counts
from .table import Family, Schedule, stream_gates

DOUBLE_BRANCHES = {"attn": ("{stream}_attn.proj", 0, 1), "mlp": ("{stream}_mlp", 0, 1)}


def branch_gates(counts: dict) -> list[Gate]:
    double = [g for i in range(counts["double_blocks"])
              for g in stream_gates(f"double_blocks.{i}", STREAMS, DOUBLE_BRANCHES)]
    single = [Gate(f"single_blocks.{i}", "", "", f"single_blocks.{i}.linear2")
              for i in range(counts["single_blocks"])]
    return double + single


FAMILY = Family(
    name="flux2",
    title="Flux.2 dev/Klein",
    classes=("comfy.ldm.flux.model.Flux",),
    accepts=lambda dm: hasattr(dm, "double_stream_modulation_img"),
    read_counts=read_counts,
    gates=branch_gates,
    dit_blocks={"double_block": "double_blocks", "single_block": "single_blocks"},
    clip_type="FLUX",
    guidance=4.0,  # ComfyUI's template image_flux2.json (FLUX.2 dev): FluxGuidance 4, Flux2Scheduler at the image size
    schedule=Schedule("comfy_extras.nodes_flux:Flux2Scheduler", {}, resolution=True, source="image_flux2.json"),
)
