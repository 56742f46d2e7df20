"""Tiny specs of the issue-11 families (part 2), merged into tiny_models.SPECS before its FAMILIES.

Imported by tiny_models once TinySpec exists there; each spec's model class is on ComfyUI 0.33.0 (specs whose class a
host lacks skip there with the reason, like every spec).
"""

from __future__ import annotations

from tiny_models import TinySpec

SPECS_PART2 = {
    # txtdim 16 x txtlayers 2: the context is the 2-layer Qwen3-VL stack flattened per token, as Krea2's TE gives it
    "krea2": TinySpec("Krea2", dict(image_model="krea2", features=64, tdim=32, txtdim=16, heads=4, kvheads=2,
                                    multiplier=2, layers=2, patch=2, channels=16, theta=1000, txtlayers=2, txtheads=2,
                                    txtkvheads=2),
                      (16, 1, 8, 8), (5, 32)),
}
