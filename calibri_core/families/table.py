"""The shape of a family table (see the modules beside this one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..sites import Gate, SiteLayout


@dataclass(frozen=True)
class Family:
    """One model family's table.

    Args:
        name: the id stored in presets (``flux``, ``sd3``, ...).
        title: what users call the models it covers.
        classes: ComfyUI class paths (``module.Class``) of the diffusion models this table was verified on, exactly
            (subclasses are refused until listed: tests/test_no_inert_site.py checks every one a host has).
        read_counts: reads block counts etc. from a diffusion model; must be JSON-serialisable.
        gates: lists the gates for those counts, in the model's block order.
        accepts: optional extra test on the diffusion model (e.g. Flux.2 vs Flux.1 share a class).
        ungated: branches that add to the residual without a gate, left untouched by design.
        dit_blocks: ComfyUI's ``patches_replace["dit"]`` block names (as SkipLayerGuidanceDiT's
            double/single layers use them) → our block containers; empty where the model ignores them.
        stacked_batch_copies: the model may run gate modules on k stacked copies of the batch
            (``cat([t, 0·t])`` timesteps); every copy of a row is scaled like that row.
        discarded: gate-granularity sites (for given counts) whose branch feeds nothing the model returns, kept
            only so that vectors keep the reference's layout; scaling them alone cannot change the output.
        row_caches: ``transformer_options`` keys of host caches that compute part of the model once, from batch
            row 0 at the first call, and reuse it for every row and step; with one present the engine refuses
            scales that differ between rows or between calls, which the cache would silently drop.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    read_counts: Callable[[Any], dict]
    gates: Callable[[dict], list[Gate]]
    accepts: Callable[[Any], bool] = lambda dm: True
    ungated: str = ""
    dit_blocks: dict = field(default_factory=dict)
    stacked_batch_copies: bool = False
    discarded: Callable[[dict], tuple[str, ...]] = lambda counts: ()
    row_caches: tuple[str, ...] = ()

    def layout(self, counts: dict) -> SiteLayout:
        return SiteLayout(self.name, dict(counts), tuple(self.gates(counts)))


def stream_gates(block: str, streams: dict[str, str], branches: dict[str, tuple[str, int, int]]) -> list[Gate]:
    """Gates of one block whose streams share a branch structure.

    ``streams`` maps a stream name to its module prefix inside the block; ``branches`` maps a branch
    name to (module suffix, chunk, chunks). ``{stream}`` in a suffix is replaced by the stream prefix.
    """
    return [Gate(block, stream, branch, f"{block}.{suffix.format(stream=prefix)}", chunk, chunks)
            for stream, prefix in streams.items()
            for branch, (suffix, chunk, chunks) in branches.items()]
