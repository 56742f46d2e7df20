"""The shape of a family table (see the modules beside this one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..sites import Gate, SiteLayout, check_counts


@dataclass(frozen=True)
class KnownModel:
    """A released checkpoint of a family and the block counts ComfyUI reads from it.

    Args:
        name: what its makers call it (``FLUX.1-dev``); the reference importer records it in a preset's provenance.
        counts: its ``read_counts`` result, i.e. what ``Family.layout`` takes. Shared: copy it before changing it.
    """

    name: str
    counts: dict


@dataclass(frozen=True)
class Schedule:
    """The sampling schedule a ComfyUI workflow of a family uses, named as the ComfyUI node that sets it.

    Args:
        node: ``module:Class`` of a ComfyUI node: a model patch (``ModelSamplingFlux``, ``ModelSamplingAuraFlow``,
            ``ModelSamplingSD3``: it returns a MODEL whose ``model_sampling`` the scheduler reads) or a sigmas node
            (``Flux2Scheduler``: it returns the SIGMAS to sample with).
        inputs: the node's inputs other than the model, the image size and the steps.
        resolution: the node also takes ``width`` and ``height`` (a resolution-dependent shift).
        source: where the values come from (a ComfyUI template, a reference pipeline's scheduler config).
    """

    node: str
    inputs: dict
    resolution: bool = False
    source: str = ""

    @property
    def node_name(self) -> str:
        return self.node.rsplit(":", 1)[1]


_SAMPLING_NODES = "comfy_extras.nodes_model_advanced"
FLUX_SHIFT_NODE = f"{_SAMPLING_NODES}:ModelSamplingFlux"
_FLUX_NODE_TOKENS = (256, 4096)  # the image-token line ModelSamplingFlux interpolates mu along


def dynamic_shift(base_shift: float, max_shift: float, base_tokens: int, max_tokens: int, source: str) -> Schedule:
    """A diffusers scheduler's resolution-dependent shift (``use_dynamic_shifting``, exponential time shift) as
    ComfyUI's ``ModelSamplingFlux``: both set mu linear in the image-token count and shift t as
    e^mu / (e^mu + 1/t − 1); the node's line runs over 256..4096 tokens, so another token range is re-expressed
    as the node's ``max_shift`` (the same line, evaluated at 4096 tokens)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    low, high = _FLUX_NODE_TOKENS
    node_base = base_shift + slope * (low - base_tokens)
    return Schedule(FLUX_SHIFT_NODE, {"base_shift": node_base, "max_shift": node_base + slope * (high - low)},
                    resolution=True, source=source)


def fixed_shift(node: str, shift: float, source: str) -> Schedule:
    """One of ComfyUI's fixed-shift model-sampling nodes (``ModelSamplingAuraFlow``, ``ModelSamplingSD3``)."""
    return Schedule(f"{_SAMPLING_NODES}:{node}", {"shift": float(shift)}, source=source)


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
        not_a_block_skip: why a block with all its gates at 0 is not the identity ComfyUI's block skip makes of it
            (a branch of the block adds to the residual ungated); empty where it is. ``calibri_core.slg`` refuses
            to re-express Skip Layer Guidance as a calibration for such a family, with this reason.
        stacked_batch_copies: the model may run gate modules on k stacked copies of the batch
            (``cat([t, 0·t])`` timesteps); every copy of a row is scaled like that row.
        token_rows: the model may run gate modules on each sample's tokens flattened into rows, sample by sample
            (B·L rows, sample b's being rows b·L to (b+1)·L − 1, as PixelDiT's pixel blocks); each of those rows is
            scaled like its sample.
        discarded: gate-granularity sites (for given counts) whose branch feeds nothing the model returns, kept
            only so that vectors keep the reference's layout; scaling them alone cannot change the output.
        row_caches: ``transformer_options`` keys of host caches that compute part of the model once, from batch
            row 0 at the first call, and reuse it for every row and step; with one present the engine refuses
            scales that differ between rows or between calls, which the cache would silently drop.
        single_sample_forward: the model refuses a forward of more than one sample (MiniMax H3 packs its tokens
            without a batch dimension); ensembles run their members one forward each, as with ``low_vram``.
        audio_video: the model denoises a (video, audio) NestedTensor latent (LTX-2, MiniMax H3); the search's
            evaluator, which samples one latent, refuses it.
        cfg: the CFG scale of the reference's "cfg case" (calibri-reference.md, "Ensemble"): N = 2 members, member
            1 on the positive prompt and member 2 on the negative one, ω starting at (cfg, 1 − cfg), which is
            ordinary CFG. None where the reference has no cfg case: one positive member with ω 1, sampled at cfg 1.
            Where the reference ran the family, its training settings (calibri-reference.md, "Search protocol");
            elsewhere the cfg of the family's ComfyUI workflow template (named beside each value). The search
            samples with them and starts from them when the run config gives no cfg / members. (Qwen-Image's is its
            configured guidance_scale, while the reference's search starts ω from cfg_scale 7: issue 9.)
        guidance: the distilled guidance passed with the conditioning when the run config gives none: the
            reference's training setting for FLUX.1 (calibri-reference.md, "Search protocol"), elsewhere the
            FluxGuidance of the family's ComfyUI template; None for none.
        rescale: the reference's pipeline rescales the combined prediction to the norm of the positive member's
            prediction (calibri-reference.md, "Ensemble": Qwen-Image, as its own true CFG does); the search's default.
        clip_type: the ``comfy.sd.CLIPType`` member ``load_clip`` reads this family's text-encoder files with
            (ComfyUI's ``comfy/sd.py``: 0.3.75, OVIS and LONGCAT_IMAGE since 0.3.76); a run config's
            ``[model.options] clip_type`` overrides it. "" where none is known.
        models: well-known checkpoints (id → ``KnownModel``): the models the reference ran (calibri-reference.md,
            "What is scaled"), with the counts ComfyUI reads from their released weights; the reference pipelines
            (``calibri_core.layouts``) and the shipped SLG presets (``calibri_core.slg``) use them.
        search_cfg: the start ω = (search_cfg, 1 − search_cfg) of the reference's cfg case: its pipelines'
            constructor default ``cfg_scale = 7.0`` (``src/models/*_sg.py``), which the training script never
            overrides (issue 9; Qwen-Image's configured ``guidance_scale = 4.0``, ``cfg`` above, only switches the
            second pass on). None where the family has no cfg case.
        search_granularity: the reference's default granularity for this family (FLUX: layer, the README quick start
            ``configs/cmaes_hpsv3_flux_layer``; SD3.5 and Qwen-Image: gate, their only one); None where the reference
            has none (the search then uses ``search.config.PROTOCOL["search.granularity"]``).
        search_population: a population size the reference's config for this family sets (Qwen-Image: 24,
            ``configs/`` Qwen config); None = pycma's default 4 + ⌊3 ln n⌋ (``src/optim/cmaes.py``).
        search_micro_batch: the reference config's micro-batch (Qwen-Image: 1); None = the protocol-wide 4. A memory
            knob only: the search's forward batch is ``[model.options] batch_size`` (see ``search.config``).
        text_padding: the model masks padded text tokens given ``attention_mask`` (1 = token, 0 = padding) and
            places the real tokens the same whatever the padding (RoPE positions do not depend on the text length), so
            conditionings of different lengths can share one forward, zero-padded and masked, with the outputs of
            the unpadded forwards (to fp32 rounding). Used by the search where the host passes ``attention_mask`` to
            the model (``search.evaluator``); False keeps one forward per text length.
        schedule: the sampling schedule the search uses (``sampling.schedule = "workflow"``): the reference's
            diffusers schedule where the reference ran the family (FLUX.1, Qwen-Image: their dynamic shift at the
            image size), else the one in the family's ComfyUI workflow template; None = the model's own
            ``model_sampling`` (what a workflow without a sampling node gets).
    """

    name: str
    title: str
    classes: tuple[str, ...]
    read_counts: Callable[[Any], dict]
    gates: Callable[[dict], list[Gate]]
    accepts: Callable[[Any], bool] = lambda dm: True
    ungated: str = ""
    dit_blocks: dict = field(default_factory=dict)
    not_a_block_skip: str = ""
    stacked_batch_copies: bool = False
    token_rows: bool = False
    discarded: Callable[[dict], tuple[str, ...]] = lambda counts: ()
    row_caches: tuple[str, ...] = ()
    single_sample_forward: bool = False
    audio_video: bool = False
    cfg: float | None = None
    guidance: float | None = None
    rescale: bool = False
    clip_type: str = ""
    models: dict[str, KnownModel] = field(default_factory=dict)
    search_cfg: float | None = None
    search_granularity: str | None = None
    search_population: int | None = None
    search_micro_batch: int | None = None
    text_padding: bool = False
    schedule: Schedule | None = None

    def layout(self, counts: dict) -> SiteLayout:
        check_counts(counts)  # bounded before anything proportional to the counts is built
        return SiteLayout(self.name, dict(counts), tuple(self.gates(counts)))

    @property
    def default_cfg(self) -> float:
        """The CFG scale a search samples with when its config gives none: ``cfg``, or 1 without a cfg case."""
        return 1.0 if self.cfg is None else self.cfg


def stream_gates(block: str, streams: dict[str, str], branches: dict[str, tuple[str, int, int]]) -> list[Gate]:
    """Gates of one block whose streams share a branch structure.

    ``streams`` maps a stream name to its module prefix inside the block; ``branches`` maps a branch
    name to (module suffix, chunk, chunks). ``{stream}`` in a suffix is replaced by the stream prefix.
    """
    return [Gate(block, stream, branch, f"{block}.{suffix.format(stream=prefix)}", chunk, chunks)
            for stream, prefix in streams.items()
            for branch, (suffix, chunk, chunks) in branches.items()]


def block_list(container: str, branches: dict[str, str]) -> tuple[Callable[[Any], dict], Callable[[dict], list[Gate]]]:
    """``read_counts`` and ``gates`` of a model whose gated blocks are the one single-stream ModuleList ``container``,
    each branch scaled at the whole output of the module ``branches[branch]`` names inside the block."""

    def read_counts(dm) -> dict:
        return {container: len(getattr(dm, container))}

    def gates(counts: dict) -> list[Gate]:
        return [Gate(f"{container}.{i}", "", branch, f"{container}.{i}.{module}")
                for i in range(counts[container]) for branch, module in branches.items()]

    return read_counts, gates
