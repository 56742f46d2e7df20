"""PixelDiT text-to-image (``comfy.ldm.pixeldit``, ComfyUI >= 0.24), a pixel-space DiT.

Patch blocks (``patch_blocks``, ``MMDiTBlockT2I``) own ``adaLN_modulation_img`` / ``_txt`` (Linear → 6 chunks:
shift, scale, gate for the joint attention, then for the SwiGLU MLP): gates 2 and 5. The text leaving the last patch
block is dropped (only the image tokens condition the pixel blocks), so its two text gates are inert.

Pixel blocks (``pixel_blocks``, ``PiTBlock``) modulate every pixel of a patch on its own: ``adaLN_modulation_msa`` /
``_mlp`` run on the B·L patch tokens flattened into rows (``token_rows``) and give, for each of the patch's P²
pixels in turn, (shift, scale, gate): the gate is chunk 2 of 3 in each of P² groups. The gate chunk is scaled where
it is produced, since the pixel MLP runs on slices of those rows.
"""

from ..sites import Gate
from .table import Family, KnownModel, stream_gates

PATCH_BRANCHES = {"attn": ("adaLN_modulation_{stream}.0", 2, 6), "mlp": ("adaLN_modulation_{stream}.0", 5, 6)}
PIXEL_MODULES = {"attn": "adaLN_modulation_msa", "mlp": "adaLN_modulation_mlp"}


def read_counts(dm) -> dict:
    return {"patch_blocks": len(dm.patch_blocks), "pixel_blocks": len(dm.pixel_blocks), "patch_size": dm.patch_size}


def gates(counts: dict) -> list[Gate]:
    patch = [g for i in range(counts["patch_blocks"])
             for g in stream_gates(f"patch_blocks.{i}", {"img": "img", "txt": "txt"}, PATCH_BRANCHES)]
    pixels = counts["patch_size"] ** 2
    pixel = [Gate(f"pixel_blocks.{i}", "", branch, f"pixel_blocks.{i}.{module}", 2, 3, groups=pixels)
             for i in range(counts["pixel_blocks"]) for branch, module in PIXEL_MODULES.items()]
    return patch + pixel


def _last_patch_text(counts: dict) -> tuple[str, ...]:
    last = counts["patch_blocks"] - 1
    return tuple(f"patch_blocks.{last}.txt.{branch}" for branch in PATCH_BRANCHES) if last >= 0 else ()


FAMILY = Family(
    name="pixeldit",
    title="PixelDiT",
    classes=("comfy.ldm.pixeldit.model.PixDiT_T2I",),
    read_counts=read_counts,
    gates=gates,
    token_rows=True,
    discarded=_last_patch_text,
    clip_type="PIXELDIT",
    cfg=4.0,  # ComfyUI's template image_pixeldit_t2i.json: KSampler cfg 4, no sampling node (the model's shift 4)
    # comfy/model_detection.py detects PixelDiT by one key and builds it with the class defaults (the released 1024px
    # stage-3 checkpoint): 14 patch blocks, 2 pixel blocks, 16×16 patches
    models={"pixeldit-1024": KnownModel("PixelDiT T2I 1024px", {"patch_blocks": 14, "pixel_blocks": 2,
                                                                "patch_size": 16})},
)
