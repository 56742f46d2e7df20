"""Independent references of the issue-11 families (part 2), merged into engine_reference.REFERENCES.

Like engine_reference, none of them touches Calibri's mechanism: each changes the gate value itself, where the model
produces it (a hook on the module that returns the modulation chunks, or weight folding of a gate Linear), never the
branch output the engine multiplies.
"""

from __future__ import annotations

from typing import Callable

from calibri_core.sites import Gate


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _by_block(gates: list[Gate], scales: dict[int, float]) -> dict[str, dict[tuple[str, str], float]]:
    by_block: dict[str, dict[tuple[str, str], float]] = {}
    for index, s in scales.items():
        by_block.setdefault(gates[index].block, {})[(gates[index].stream, gates[index].branch)] = s
    return by_block


def chunk_tuple_hooks(module: str, positions: dict[tuple[str, str], int]) -> Callable:
    """A reference for blocks whose ``module`` (relative to the block) returns the modulation as a tuple of chunks:
    a forward hook multiplies the gate entry ``positions[(stream, branch)]`` by its scale."""

    def install(dm, gates: list[Gate], scales: dict[int, float]) -> None:
        for block, per_gate in _by_block(gates, scales).items():
            def hook(mod, args, out, per_gate=per_gate):
                out = list(out)
                for key, s in per_gate.items():
                    out[positions[key]] = out[positions[key]] * s
                return tuple(out)

            _get(dm, f"{block}.{module}").register_forward_hook(hook)

    return install


REFERENCES_PART2 = {
    "krea2": chunk_tuple_hooks("mod", {("", "attn"): 2, ("", "mlp"): 5}),  # (pre-/post-) scale, shift, gate
}
