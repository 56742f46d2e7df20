"""Lumina-Image-2.0 and Z-Image (``comfy.ldm.lumina``; one architecture, two families).

Blocks add ``x + tanh(gate) · RMSNorm(branch)``. Scaling the adaLN output would scale the gate *before*
the tanh, which is not the paper's operation; the engine multiplies the RMSNorm'd branch
(``attention_norm2`` / ``ffn_norm2`` outputs), i.e. the post-tanh gate value where it meets its branch.
Sites: the main ``layers`` and the gated ``noise_refiner`` blocks. The ``context_refiner`` blocks (and Z-Image
Omni's ``siglip_refiner``) are ungated (``modulation=False``) and are never touched.

Z-Image Omni (NextDiT with a SigLIP embedder, given reference latents) doubles its timesteps and gates each token
slice with its own half of the modulation; the branch it multiplies keeps the batch, so scaling the branch scales
both halves alike. Z-Image pixel space (``NextDiTPixelSpace``) has the same blocks and another output head.
Both are verified in tests/test_lumina_variants.py.
"""

from ..sites import Gate
from .table import Family, fixed_shift

BRANCHES = {"attn": "attention_norm2", "mlp": "ffn_norm2"}


def read_counts(dm) -> dict:
    return {"noise_refiner": len(dm.noise_refiner), "layers": len(dm.layers)}


def gates(counts: dict) -> list[Gate]:
    blocks = [f"noise_refiner.{i}" for i in range(counts["noise_refiner"])]
    blocks += [f"layers.{i}" for i in range(counts["layers"])]
    return [Gate(block, "", branch, f"{block}.{module}") for block in blocks for branch, module in BRANCHES.items()]


def _is_z_image(dm) -> bool:
    # Z-Image's adaLN is a bare Linear from the 256-d t-embedding; Lumina2's is (SiLU, Linear).
    return len(dm.layers[0].adaLN_modulation) == 1


_UNGATED = "context_refiner (and siglip_refiner) blocks have no gates (modulation=False) and are left untouched"
_CLASSES = ("comfy.ldm.lumina.model.NextDiT",)

Z_IMAGE = Family(name="z_image", title="Z-Image", classes=_CLASSES + ("comfy.ldm.lumina.model.NextDiTPixelSpace",),
                 accepts=_is_z_image, read_counts=read_counts, gates=gates, ungated=_UNGATED, clip_type="LUMINA2",
                 # image_z_image_turbo.json: KSampler cfg 1 (no cfg case; the base model's image_z_image.json uses
                 # cfg 4: set sampling.cfg = 4 there), ModelSamplingAuraFlow 3 in both
                 schedule=fixed_shift("ModelSamplingAuraFlow", 3.0, "image_z_image_turbo.json"))
LUMINA2 = Family(name="lumina2", title="Lumina-Image-2.0", classes=_CLASSES,
                 accepts=lambda dm: not _is_z_image(dm), read_counts=read_counts, gates=gates, ungated=_UNGATED,
                 clip_type="LUMINA2",
                 cfg=4.0,  # image_netayume_lumina_t2i.json (a Lumina-Image-2.0 model): cfg 4, ModelSamplingAuraFlow 4
                 schedule=fixed_shift("ModelSamplingAuraFlow", 4.0, "image_netayume_lumina_t2i.json"))
