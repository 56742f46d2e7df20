"""The reference implementation's flat ``solution`` vector <-> ``Calibration``.

The reference (``v-gen-ai/Calibri``) searches one flat float vector per candidate and saves it as
``cmaes_step_NNNN.json``. Its order is a concatenation of *segments*: each segment lists some sites,
and the vector holds, for each member in turn, that segment's sites; after the last segment comes
ω, one weight per member (the authors' v-gen-ai/Calibri ``src/optim/cmaes.py``):

* FLUX block: [double blocks] [single blocks] ω
* FLUX layer: [double (attn, mlp)] [single blocks] ω
* FLUX gate:  [double img (attn, mlp)] [double txt (attn, mlp)] [single blocks] ω
* SD3.5 gate: [x (attn, mlp)] [context (attn, mlp), context-gated blocks] [x attn2, dual-attention blocks] ω
* Qwen-Image gate: [(img attn, txt attn, img mlp, txt mlp) per block] ω

A ``Calibration`` keeps its sites in the model's block order (from the family table), which differs
from these orders; the mapping is always by site name, never by position. The search reuses the
same ordering, so ``from_reference_vector`` / ``to_reference_vector`` are the single pair of
functions for every pipeline. This module is pure: no torch, no ComfyUI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from .calibration import PROMPTS, Calibration, Member
from .families import KnownModel, get_family
from .preset import MAX_FILE_BYTES, Preset, parse_small_int, tool_version

Segments = Callable[[dict], list[list[str]]]


def _flux_segments(granularity: str) -> Segments:
    def segments(counts: dict) -> list[list[str]]:
        doubles = range(counts["double_blocks"])
        single = [f"single_blocks.{i}" for i in range(counts["single_blocks"])]
        if granularity == "block":
            return [[f"double_blocks.{i}" for i in doubles], single]
        if granularity == "layer":
            return [[f"double_blocks.{i}.{b}" for i in doubles for b in ("attn", "mlp")], single]
        return [[f"double_blocks.{i}.img.{b}" for i in doubles for b in ("attn", "mlp")],
                [f"double_blocks.{i}.txt.{b}" for i in doubles for b in ("attn", "mlp")],
                single]
    return segments


def _sd3_segments(counts: dict) -> list[list[str]]:
    blocks = range(counts["joint_blocks"])
    pre_only = set(counts["context_pre_only_blocks"])
    return [[f"joint_blocks.{i}.x.{b}" for i in blocks for b in ("attn", "mlp")],
            [f"joint_blocks.{i}.context.{b}" for i in blocks if i not in pre_only for b in ("attn", "mlp")],
            [f"joint_blocks.{i}.x.attn2" for i in sorted(counts["dual_attention_blocks"])]]


def _qwen_segments(counts: dict) -> list[list[str]]:
    return [[f"transformer_blocks.{i}.{s}" for i in range(counts["transformer_blocks"])
             for s in ("img.attn", "txt.attn", "img.mlp", "txt.mlp")]]


@dataclass(frozen=True)
class Pipeline:
    """One reference pipeline: the model the reference ran and its flat order per granularity.

    Args:
        name: the pipeline id used by the CLI and the search (``flux``, ``sd3.5-medium``, ...).
        family: the ``calibri_core.families`` id its calibrations belong to.
        model: that model, from the family table's ``models``: its ``name`` and default ``counts``.
        orders: granularity -> function of counts returning the segments of the flat order.
    """

    name: str
    family: str
    model: KnownModel
    orders: dict[str, Segments]

    @property
    def title(self) -> str:
        """The model the reference ran."""
        return self.model.name

    @property
    def counts(self) -> dict:
        """The family counts of that model (what ``family.layout(counts)`` takes)."""
        return self.model.counts

    @property
    def cfg(self) -> bool:
        """True for the reference's "cfg case" (member 1 positive, member 2 negative prompt): the family has a cfg."""
        return get_family(self.family).cfg is not None


def _pipeline(name: str, family: str, model: str, orders: dict[str, Segments]) -> Pipeline:
    return Pipeline(name, family, get_family(family).models[model], orders)


PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    _pipeline("flux", "flux", "flux1-dev", {g: _flux_segments(g) for g in ("block", "layer", "gate")}),
    _pipeline("sd3.5-medium", "sd3", "sd3.5-medium", {"gate": _sd3_segments}),
    _pipeline("sd3.5-large", "sd3", "sd3.5-large", {"gate": _sd3_segments}),
    _pipeline("qwen-image", "qwen_image", "qwen-image", {"gate": _qwen_segments}),
)}


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ValueError(f"Calibri: unknown reference pipeline {name!r}; expected one of "
                         f"{sorted(PIPELINES)}.") from None


def _segments(pipeline: Pipeline, granularity: str, counts: dict | None) -> tuple[dict, list[list[str]]]:
    if granularity not in pipeline.orders:
        raise ValueError(f"Calibri: the reference has no {granularity!r} granularity for {pipeline.name}; "
                         f"it has {sorted(pipeline.orders)}. Use one of those (or convert the calibration "
                         f"with Calibration.convert first).")
    counts = dict(pipeline.counts if counts is None else counts)
    segments = pipeline.orders[granularity](counts)
    # The flat order must name exactly the family table's sites: a mismatch is a bug in one of the two.
    expected = get_family(pipeline.family).layout(counts).site_names(granularity)
    flat = [s for seg in segments for s in seg]
    if sorted(flat) != sorted(expected):
        raise ValueError(f"Calibri: internal error: the {pipeline.name} {granularity} flat order does not match "
                         f"the {pipeline.family} family table for counts {counts}.")
    return counts, segments


def reference_order(pipeline: str, granularity: str, members: int,
                    counts: dict | None = None) -> list[tuple[int, str]]:
    """The meaning of each entry of a flat vector: ``(member, site name)``, or ``(member, "ω")``.

    Args:
        pipeline: a key of ``PIPELINES``.
        granularity: ``block``/``layer``/``gate`` (only ``gate`` for SD3.5 and Qwen-Image).
        members: the ensemble size N (>= 1).
        counts: family counts; default the pipeline's reference model.
    """
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"Calibri: the number of members must be a positive integer; got {members!r}.")
    _, segments = _segments(get_pipeline(pipeline), granularity, counts)
    order = [(m, site) for seg in segments for m in range(members) for site in seg]
    return order + [(m, "ω") for m in range(members)]


def reference_vector_length(pipeline: str, granularity: str, members: int, counts: dict | None = None) -> int:
    return len(reference_order(pipeline, granularity, members, counts))


def _default_prompts(pipeline: Pipeline, members: int) -> tuple[str, ...]:
    if not pipeline.cfg or members == 1:
        return ("positive",) * members
    if members == 2:
        return ("positive", "negative")
    raise ValueError(f"Calibri: {pipeline.name} is a CFG pipeline; the reference's cfg case has N = 2 "
                     f"(positive, negative). For N = {members} give the prompt of every member "
                     f"(prompts=... / --prompts), each one of {PROMPTS}.")


def from_reference_vector(vector: Sequence[float], pipeline: str, granularity: str, members: int | None = None,
                          counts: dict | None = None, prompts: Sequence[str] | None = None) -> Calibration:
    """A flat reference/search vector as a ``Calibration`` (sites in model order).

    Args:
        vector: the flat vector, in the reference's order (module docstring).
        pipeline: a key of ``PIPELINES``.
        granularity: ``block``/``layer``/``gate``.
        members: N; inferred from the length when None (length = N · (sites + 1)).
        counts: family counts; default the pipeline's reference model.
        prompts: each member's prompt; default all positive (FLUX) or (positive, negative) for CFG pipelines.
    """
    spec = get_pipeline(pipeline)
    counts, segments = _segments(spec, granularity, counts)
    values = [float(v) for v in vector]
    sites = sum(len(s) for s in segments)
    if members is None:
        if values and len(values) % (sites + 1) == 0:
            members = len(values) // (sites + 1)
        else:
            raise ValueError(f"Calibri: a {spec.name} ({spec.title}) {granularity} vector has N × ({sites} scales "
                             f"+ 1 ω) entries, i.e. {sites + 1}, {2 * (sites + 1)}, ... for N = 1, 2, ...; got "
                             f"{len(values)}. Check --pipeline and --granularity.")
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ValueError(f"Calibri: the number of members must be a positive integer; got {str(members)[:24]}.")
    # by arithmetic, before reference_order lists members × sites: a hostile shapes["n_models"] is never expanded
    if len(values) != members * (sites + 1):
        raise ValueError(f"Calibri: a {spec.name} ({spec.title}) {granularity} vector with N = {members} members "
                         f"must have {members * (sites + 1)} entries (N × {sites} scales + N ω); got {len(values)}. "
                         f"Check --pipeline, --granularity and --members.")
    order = reference_order(spec.name, granularity, members, counts)
    prompts = tuple(prompts) if prompts is not None else _default_prompts(spec, members)
    if len(prompts) != members:
        raise ValueError(f"Calibri: {len(prompts)} prompts given for {members} members; give one per member.")
    table: list[dict[str, float]] = [{} for _ in range(members)]
    for (m, site), value in zip(order, values):
        table[m][site] = value
    model_sites = get_family(spec.family).layout(counts).site_names(granularity)
    return Calibration(spec.family, granularity, model_sites, tuple(
        Member(tuple(table[m][s] for s in model_sites), table[m]["ω"], prompts[m]) for m in range(members)))


def to_reference_vector(calibration: Calibration, pipeline: str, counts: dict | None = None) -> list[float]:
    """A ``Calibration`` as the reference's flat vector (the inverse of ``from_reference_vector``).

    Sites are matched by name, so the calibration's own site order does not matter; its granularity
    must be one the reference has for that pipeline.
    """
    spec = get_pipeline(pipeline)
    if calibration.family != spec.family:
        raise ValueError(f"Calibri: this calibration is for the {calibration.family} family; the {spec.name} "
                         f"pipeline needs {spec.family}. Choose the matching --pipeline.")
    counts, _ = _segments(spec, calibration.granularity, counts)
    calibration.check_against(get_family(spec.family).layout(counts))
    by_name = [dict(zip(calibration.sites, m.scales)) | {"ω": m.weight} for m in calibration.members]
    return [by_name[m][site] for m, site in reference_order(spec.name, calibration.granularity,
                                                           len(calibration.members), counts)]


def _read_checkpoint(path: str):
    """A reference checkpoint's JSON, refusing what no checkpoint holds before it is parsed or used (issue 10)."""
    def unreadable(why: str) -> ValueError:
        return ValueError(f"Calibri: cannot read {path!r} as JSON ({why}); expected a reference "
                          f"cmaes_step_NNNN.json checkpoint.")

    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:  # a checkpoint is a few kB of numbers
            raise unreadable(f"it is larger than {MAX_FILE_BYTES // 2 ** 20} MiB")
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_int=parse_small_int)
    except RecursionError:
        raise unreadable("it nests deeper than Python can read") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if str(e).startswith("Calibri:"):
            raise
        raise unreadable(str(e)) from None


def import_reference_checkpoint(path: str, pipeline: str, granularity: str, members: int | None = None,
                                prompts: Sequence[str] | None = None, counts: dict | None = None,
                                model_name: str | None = None) -> Preset:
    """Read a reference ``cmaes_step_NNNN.json`` checkpoint as a ``Preset``.

    Args:
        path: the JSON file (keys ``step``, ``train_best``, ``train_mean``, ``val``, ``solution``,
            ``shapes``, ``sigma``, ``timestamp``).
        pipeline, granularity, members, prompts, counts: as ``from_reference_vector``; when ``members``
            is None the checkpoint's ``shapes["n_models"]`` is used if present, else it is inferred.
        model_name: recorded in the provenance (default the pipeline's model).
    """
    if not os.path.exists(path):
        raise ValueError(f"Calibri: reference checkpoint {path!r} does not exist. Give the path of a "
                         f"cmaes_step_NNNN.json from the reference's checkpoints/step_N/ folder.")
    data = _read_checkpoint(path)
    if not isinstance(data, dict) or not isinstance(data.get("solution"), list):
        raise ValueError(f"Calibri: {path!r} has no 'solution' list; expected a reference cmaes_step_NNNN.json "
                         f"with keys step, train_best, train_mean, val, solution, shapes, sigma, timestamp.")
    solution = data["solution"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in solution):
        raise ValueError(f"Calibri: {path!r}: 'solution' must hold only numbers.")
    shapes = data.get("shapes")
    if members is None and isinstance(shapes, dict) and isinstance(shapes.get("n_models"), int):
        members = shapes["n_models"]
    try:
        calibration = from_reference_vector(solution, pipeline, granularity, members, counts, prompts)
    except ValueError as e:  # name the file: a CLI user or CalibriLoadPreset may be reading several
        raise ValueError(f"Calibri: {path!r}: {str(e).removeprefix('Calibri: ')}") from None
    spec = get_pipeline(pipeline)
    provenance = {
        "source": "reference checkpoint (v-gen-ai/Calibri)",
        "source_file": os.path.basename(path),
        "pipeline": spec.name,
        "model": {"name": model_name or spec.title},
        "tool": "calibri_core.preset import",
        "tool_version": tool_version(),
    }
    for key in ("step", "train_best", "train_mean", "val", "sigma", "timestamp", "shapes"):
        value = data.get(key)
        try:
            json.dumps(value, allow_nan=False)  # NaN/inf (e.g. no validation yet) cannot go in strict JSON
        except (TypeError, ValueError):
            continue
        if value is not None:
            provenance[key] = value
    counts = dict(spec.counts if counts is None else counts)
    return Preset(calibration, counts, provenance)


# The reference's ``shapes`` keys that name block counts, and the family count each one must equal.
_SHAPE_COUNTS = {"n_double": "double_blocks", "n_single": "single_blocks"}
# Reference scalars per double block in ``shapes["doubles"]`` (per member) at each FLUX granularity.
_PER_DOUBLE_BLOCK = {1: "block", 2: "layer", 4: "gate"}


def _import_command(path: str, pipelines: Sequence[str], granularities: Sequence[str]) -> str:
    name = os.path.basename(path)
    return (f"python -m calibri_core.preset import {name} --pipeline {'|'.join(pipelines)} "
            f"--granularity {'|'.join(granularities)} -o {os.path.splitext(name)[0]}.safetensors")


def import_reference_for_layout(path: str, layout) -> Preset:
    """Import a reference ``cmaes_step_NNNN.json`` for the connected model (CalibriLoadPreset's reader).

    The pipeline comes from the model's family, the granularity and member count from the checkpoint's
    ``shapes`` (``n_models``, ``doubles``/``n_double``) and the length of its ``solution``, the counts from the
    model's own layout. Then ``import_reference_checkpoint`` converts it, so a file loads exactly as
    ``python -m calibri_core.preset import`` converts it.

    Args:
        path: the checkpoint.
        layout: the connected model's ``SiteLayout`` (``host.model_layout``).

    Raises:
        ValueError: no reference pipeline for the family, counts in ``shapes`` that differ from the model's,
            a length no granularity explains, or several that do; the message names the ``import`` command.
    """
    pipelines = [p for p in PIPELINES.values() if p.family == layout.family]
    if not pipelines:
        raise ValueError(f"Calibri: {os.path.basename(path)} is a reference checkpoint, but the reference has no "
                         f"pipeline for the connected model {layout.describe()}; it has "
                         f"{sorted({p.family for p in PIPELINES.values()})}. Connect the model it was searched for.")
    data = _read_checkpoint(path)
    solution = data.get("solution") if isinstance(data, dict) else None
    if not isinstance(solution, list):
        raise ValueError(f"Calibri: {path!r} has no 'solution' list; expected a reference cmaes_step_NNNN.json.")
    shapes = data.get("shapes") if isinstance(data.get("shapes"), dict) else {}
    for key, count in _SHAPE_COUNTS.items():
        if isinstance(shapes.get(key), int) and count in layout.counts and shapes[key] != layout.counts[count]:
            raise ValueError(f"Calibri: {os.path.basename(path)} was searched on a model with {shapes[key]} "
                             f"{count} (shapes[{key!r}]); the connected model is {layout.describe()}. Connect "
                             f"the model it was made for.")
    members = shapes.get("n_models") if isinstance(shapes.get("n_models"), int) else None
    granularities = sorted({g for p in pipelines for g in p.orders})
    if members and isinstance(shapes.get("doubles"), int) and shapes.get("n_double"):
        per_block = _PER_DOUBLE_BLOCK.get(shapes["doubles"] // (members * shapes["n_double"]))
        granularities = [g for g in granularities if g == per_block]
    fits = []
    for granularity in granularities:
        sites = len(layout.site_names(granularity))
        n = members if members else (len(solution) // (sites + 1) if len(solution) % (sites + 1) == 0 else 0)
        if n and len(solution) == n * (sites + 1):
            fits.append(granularity)
    names = [p.name for p in pipelines]
    if len(fits) != 1:
        why = (f"its {len(solution)} values fit {' and '.join(fits)}" if fits else
               f"its {len(solution)} values (members: {members or 'not recorded'}) fit no granularity of "
               f"{layout.describe()}")
        raise ValueError(f"Calibri: cannot tell how to read {os.path.basename(path)}: {why}. Convert it with "
                         f"`{_import_command(path, names, fits or granularities)}` and load the .safetensors.")
    # Pipelines of one family share their flat order; the one whose model has these counts names it best.
    pipeline = next((p for p in pipelines if p.counts == layout.counts), pipelines[0])
    return import_reference_checkpoint(path, pipeline.name, fits[0], members, counts=dict(layout.counts),
                                       model_name=None if pipeline.counts == layout.counts else layout.describe())
