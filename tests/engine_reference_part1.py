"""Independent references of the issue-11 families (part 1), merged into engine_reference.REFERENCES.

None touches Calibri's mechanism. Families whose gate is a chunk of a per-block Linear (Mage-Flow, Lens, HiDream,
HunyuanVideo and its token refiner, Kandinsky 5, CogVideoX, AuraFlow, PixelDiT with its per-pixel gate rows) are
weight-folded by engine_reference itself (``FOLDED_PART1``): the gate rows of that Linear are multiplied. PixArt, whose
gate is ``scale_shift_table[k] + t0[k]`` with a shared ``t0``, gets a pre-hook on each block that rewrites ``t0`` so
the gate itself comes out scaled.
"""

from __future__ import annotations

from calibri_core.sites import Gate

FOLDED_PART1 = ("mage_flow", "lens", "hidream", "hunyuan_video", "hunyuan_video15", "hunyuan_image21", "kandinsky5",
                "kandinsky5_image", "cogvideox", "cogvideox15", "auraflow", "pixeldit")

PIXART_CHUNKS = {"attn": 2, "mlp": 5}  # (shift, scale, gate) for self-attention, then for the MLP


def _pixart_gate_hooks(dm, gates: list[Gate], scales: dict[int, float]) -> None:
    """``t0`` arrives as the block's third positional argument, [B, 6·D]; with the identity
    s·(table[k] + t0[k]) = table[k] + (s·t0[k] + (s − 1)·table[k]), its chunk k is rewritten so the gate is s·gate."""
    by_block: dict[str, dict[str, float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[gates[index].branch] = s
    for block, per_branch in by_block.items():
        module = dm.get_submodule(block)

        def pre_hook(mod, args, per_branch=per_branch):
            x, y, t = args[:3]
            chunks = t.reshape(t.shape[0], 6, -1).clone()
            table = mod.scale_shift_table.to(chunks)
            for branch, k in PIXART_CHUNKS.items():
                if branch in per_branch:
                    s = per_branch[branch]
                    chunks[:, k] = s * chunks[:, k] + (s - 1) * table[k]
            return (x, y, chunks.reshape(t.shape)) + tuple(args[3:])

        module.register_forward_pre_hook(pre_hook)


HOOKED_PART1 = {"pixart_alpha": _pixart_gate_hooks, "pixart_sigma": _pixart_gate_hooks}
