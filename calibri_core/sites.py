"""Gate sites: the names every calibration, preset and search vector is keyed by.

A *gate* is one place where a DiT block adds a gated branch to its residual stream
(``x = x + gate * branch(x)``, paper §3). Each gate is named by its block, its stream
(image/text, or none) and its branch (attn, mlp, ...). The three granularities of the
paper group gates:

* ``gate``  - one scale per gate:                 ``double_blocks.7.img.attn``
* ``layer`` - one scale per branch kind and block: ``double_blocks.7.attn`` (image and text share it)
* ``block`` - one scale per block:                 ``double_blocks.7``

Gates also carry where the engine multiplies them: the module whose output is scaled and,
when that output packs several modulation chunks, which chunk is the gate.
This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GRANULARITIES = ("block", "layer", "gate")


@dataclass(frozen=True)
class Gate:
    """One gated branch of one block, and where the engine scales it.

    Args:
        block: block path inside the diffusion model, e.g. ``double_blocks.7``.
        stream: ``img``/``txt``/``x``/``context``, or ``""`` for single-stream blocks.
        branch: ``attn``/``mlp``/``attn2``, or ``""`` when one gate covers the whole block.
        module: path of the module whose output is multiplied, relative to the diffusion model.
        chunk: index of the gate among ``chunks`` equal slices of that output's last dimension.
        chunks: 1 when the whole output is the gated branch (or the gate itself).
    """

    block: str
    stream: str
    branch: str
    module: str
    chunk: int = 0
    chunks: int = 1

    def name(self, granularity: str) -> str:
        if granularity == "gate":
            parts = (self.block, self.stream, self.branch)
        elif granularity == "layer":
            parts = (self.block, self.branch)
        elif granularity == "block":
            parts = (self.block,)
        else:
            raise ValueError(f"Calibri: unknown granularity {granularity!r}; expected one of {GRANULARITIES}.")
        return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class SiteLayout:
    """The ordered gates of one model: what a calibration for it must name.

    ``counts`` records how the layout was read from the model (block counts, dual-attention
    blocks, ...) so that a mismatch between a preset and a model can be explained.
    """

    family: str
    counts: dict = field(compare=True)
    gates: tuple[Gate, ...]

    def __hash__(self) -> int:
        return hash((self.family, self.gates))

    def site_names(self, granularity: str) -> tuple[str, ...]:
        """Site names at a granularity, in model order, each once."""
        seen: dict[str, None] = {}
        for gate in self.gates:
            seen.setdefault(gate.name(granularity), None)
        return tuple(seen)

    def gate_to_site(self, granularity: str) -> tuple[int, ...]:
        """For each gate, the index of the site that holds its scale at ``granularity``."""
        index = {name: i for i, name in enumerate(self.site_names(granularity))}
        return tuple(index[gate.name(granularity)] for gate in self.gates)

    def describe(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{self.family} ({counts})"
