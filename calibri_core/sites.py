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

MAX_BLOCKS = 1024
"""The most blocks a count may name. The largest supported DiTs have 60 (Qwen-Image) and 57 (FLUX.1); counts come
from files and texts that anyone can write, and a layout is built in proportion to them, so they are bounded first
(issue 10: ``joint_blocks = 10**9`` built 10⁹ gates before any check)."""
MAX_COUNT_KEYS = 16


def check_counts(counts: object) -> None:
    """Raise a ValueError unless ``counts`` is a small, well-formed ``SiteLayout.counts``, before anything is built.

    Counts are a dict of at most ``MAX_COUNT_KEYS`` string keys whose values are booleans, block counts (integers
    0..``MAX_BLOCKS``) or lists of distinct block indices, each below the largest block count of the dict (so no
    list is longer than the block count). The family's ``gates`` then reads the keys it needs.
    """
    if not isinstance(counts, dict):
        raise ValueError(f"Calibri: block counts must be a JSON object (e.g. {{\"double_blocks\": 19}}); "
                         f"got {type(counts).__name__}.")
    if not counts or len(counts) > MAX_COUNT_KEYS:
        raise ValueError(f"Calibri: block counts must have 1 to {MAX_COUNT_KEYS} keys; got {len(counts)}.")
    sizes = []
    for key, value in counts.items():
        if not isinstance(key, str):
            raise ValueError(f"Calibri: block count names must be strings; got {key!r:.40}.")
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_BLOCKS:
                raise ValueError(f"Calibri: block count {key!r} = {_short(value)} is outside 0..{MAX_BLOCKS} "
                                 f"(the most blocks a model may have); the counts are damaged or not from a model.")
            sizes.append(value)
    blocks = max(sizes, default=0)
    for key, value in counts.items():
        if isinstance(value, bool) or (isinstance(value, int) and not isinstance(value, bool)):
            continue
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"Calibri: block count {key!r} must be an integer, a boolean or a list of block "
                             f"indices; got {type(value).__name__}.")
        if len(value) > blocks:
            raise ValueError(f"Calibri: block count {key!r} lists {len(value)} blocks, more than the {blocks} "
                             f"the counts have; the counts are damaged or not from a model.")
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < blocks]
        if bad:
            raise ValueError(f"Calibri: block count {key!r} holds {_short(bad[0])}, not a block index in "
                             f"0..{blocks - 1}.")
        if len(set(value)) != len(value):
            raise ValueError(f"Calibri: block count {key!r} lists a block twice.")


def _short(value: object) -> str:
    if isinstance(value, int) and abs(value) >= 10 ** 30:  # str() of a huge int is slow, and refused past 4300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)[:60]


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
        groups: the last dimension holds ``groups`` repeats of the ``chunks`` slices, and the gate is slice ``chunk``
            of every repeat (PixelDiT's pixel blocks: (shift, scale, gate) for each pixel of a patch, in turn).
    """

    block: str
    stream: str
    branch: str
    module: str
    chunk: int = 0
    chunks: int = 1
    groups: int = 1

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
