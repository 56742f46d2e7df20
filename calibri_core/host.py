"""The one module of calibri_core that touches ComfyUI's ModelPatcher.

One mechanism serves every family (paper §3): for each gate listed by the family table, the output
of the module named there is multiplied, in the slice that is the gate (or whole, when the module's
output is the gated branch itself), by a scale that may differ for every batch row. The scales for
the rows of a forward pass come from a *row source* that the APPLY_MODEL wrapper asks once per
call; apply, ensembles and the search differ only in how they fill those rows.

Everything is registered on a ``clone()`` of the ModelPatcher under the key ``"calibri"``:
object patches (restored on unpatch, chained to any earlier patch of the same forward) and one
APPLY_MODEL wrapper. Weights are never copied or modified, so LoRA weight patches compose.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .calibration import Calibration
from .families import Family, detect
from .sites import Gate, SiteLayout

PATCH_KEY = "calibri"

RowSource = Callable[[dict, int], Optional[torch.Tensor]]
"""(transformer_options, batch size) → [1 or B, gates] float tensor, or None for identity."""


class _ActiveRows:
    """The gate scales of the forward pass in flight, shared by a clone's patched forwards.

    Each patched module's multiplier is cached for the rows tensor it was built from: a static calibration
    hands the same tensor to every step, so its multipliers are built once per sampling run, not per step.
    """

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None
        self._built_for: Optional[torch.Tensor] = None
        self._factors: dict[tuple, torch.Tensor] = {}

    def set(self, rows: Optional[torch.Tensor]) -> None:
        self.rows = rows
        if rows is not None and rows is not self._built_for:
            self._built_for, self._factors = rows, {}

    def factor(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._factors:
            self._factors[key] = build()
        return self._factors[key]


def _scaled_forward(original: Callable, active: _ActiveRows, gates: list[tuple[int, Gate]], module: str,
                    stacked_copies: bool) -> Callable:
    """Wrap one module's forward so that its gate slices are multiplied by the active row scales.

    ``stacked_copies``: the family may run this module on k stacked copies of the batch ([rows; rows'], as
    Qwen-Image-Edit-2511's zero-timestep reference half); each copy of a row then takes that row's scales.
    """
    columns = [column for column, _ in gates]
    chunks = gates[0][1].chunks
    chunk_of = [gate.chunk for _, gate in gates]

    def build(out: torch.Tensor) -> torch.Tensor:
        rows = active.rows.to(device=out.device, dtype=out.dtype)[:, columns]
        copies, remainder = divmod(out.shape[0], rows.shape[0])
        if stacked_copies and remainder == 0 and copies > 1:
            rows = rows.repeat(copies, 1)
        if rows.shape[0] not in (1, out.shape[0]):
            raise RuntimeError(f"Calibri: {module} produced a batch of {out.shape[0]} rows but {rows.shape[0]} rows "
                               "of scales were supplied; this model changes its batch inside the blocks.")
        if chunks == 1:  # the whole output is the gated branch (or the gate): one scale per row
            return rows[:, 0].reshape((-1,) + (1,) * (out.ndim - 1))
        factor = torch.ones(rows.shape[0], chunks, device=out.device, dtype=out.dtype)
        factor[:, chunk_of] = rows
        factor = factor.repeat_interleave(out.shape[-1] // chunks, dim=1)
        return factor.reshape((factor.shape[0],) + (1,) * (out.ndim - 2) + (out.shape[-1],))

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        if active.rows is None:
            return out
        key = (module, out.device, out.dtype, out.ndim, out.shape[0], out.shape[-1])
        return out * active.factor(key, lambda: build(out))

    return forward


_FIRST_ROWS: "weakref.WeakKeyDictionary[Any, Optional[torch.Tensor]]" = weakref.WeakKeyDictionary()


def _check_cached_rows(key: str, cache: Any, rows: Optional[torch.Tensor]) -> None:
    """Refuse scales that a row cache (see ``Family.row_caches``) would drop: rows that differ from each other, or
    from the first call that filled the cache (an active range that starts or ends mid-run, a varying ensemble)."""
    if rows is not None and rows.shape[0] > 1 and not bool(torch.all(rows == rows[:1])):
        raise RuntimeError(f"Calibri: ComfyUI's {key!r} (set by a cache node on this MODEL) reuses batch row 0's "
                           "results for every row, so the rows of this ensemble or search batch would all get "
                           "row 0's calibration in that part of the model. Remove the cache node, or use one "
                           "calibration with CalibriApply over the whole schedule.")
    first = rows[:1] if rows is not None else None
    try:
        if not getattr(cache, "slots", True):  # emptied (PoseBranchCache.free() runs after every sampling run)
            _FIRST_ROWS[cache] = first
        seen = _FIRST_ROWS.setdefault(cache, first)
    except TypeError:  # not weak-referenceable: nothing to remember it by, so no later call can be checked
        return
    same = (seen is None and first is None) or (
        seen is not None and first is not None and seen.shape == first.shape and bool(torch.equal(seen, first)))
    if not same:
        raise RuntimeError(f"Calibri: ComfyUI's {key!r} (set by a cache node on this MODEL) computed part of the "
                           "model at the first step and reuses it, but the calibration changes during this run "
                           "(start_percent/end_percent, or another calibration on the same cache), so that part "
                           "would keep the first step's scales. Remove the cache node, or set start_percent 0 and "
                           "end_percent 1.")


def model_layout(model: Any) -> tuple[Family, SiteLayout]:
    """Family table and gate layout of a ComfyUI MODEL (a ModelPatcher)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError(f"Calibri: expected a ComfyUI MODEL (ModelPatcher) but got {type(model).__name__}.")
    return detect(diffusion_model)


def token_patch(model: Any) -> int:
    """Side of the square of latent pixels one transformer token covers (1 when the model does not patchify)."""
    patch = getattr(model.model.diffusion_model, "patch_size", 1) or 1
    return int(patch[-1] if isinstance(patch, (tuple, list)) else patch)


def apply_row_scales(model: Any, row_source: RowSource, *, output_weight: Optional[Callable] = None) -> Any:
    """Clone ``model`` so every forward multiplies each gate by per-row scales.

    Args:
        model: a ComfyUI ModelPatcher of a supported family; it is not modified.
        row_source: called once per model call with ``(transformer_options, batch_size)``; returns a
            ``[1 or batch, gates]`` tensor in the layout's gate order, or None to run unscaled.
        output_weight: optional ``(transformer_options, batch_size) → [1 or batch] tensor | None``;
            multiplies the model's output (velocity) per row, paper §3.3's ω.

    Returns:
        The patched clone.
    """
    family, layout = model_layout(model)
    patched = model.clone()
    active = _ActiveRows()
    by_module: dict[str, list[tuple[int, Gate]]] = {}
    for column, gate in enumerate(layout.gates):
        by_module.setdefault(gate.module, []).append((column, gate))
    for module, gates in by_module.items():
        key = f"diffusion_model.{module}.forward"
        patched.add_object_patch(key, _scaled_forward(patched.get_model_object(key), active, gates, module,
                                                      family.stacked_batch_copies))

    def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        rows = row_source(transformer_options, x.shape[0])
        if rows is not None and bool(torch.all(rows == 1)):
            rows = None  # identity: leave the forward bit-identical and free
        for key in family.row_caches:
            if transformer_options.get(key) is not None:
                _check_cached_rows(key, transformer_options[key], rows)
        previous = active.rows
        active.set(rows)
        try:
            denoised = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            active.set(previous)
        weight = output_weight(transformer_options, x.shape[0]) if output_weight else None
        if weight is None or bool(torch.all(weight == 1)):
            return denoised
        # Flow models return x0 = x − σ·v; scaling v by ω is x + ω·(x0 − x) (see comfyui.md C).
        weight = weight.to(denoised).reshape((-1,) + (1,) * (denoised.ndim - 1))
        return x + weight * (denoised - x)

    import comfy.patcher_extension  # ComfyUI is imported only when a model is actually patched

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, apply_model_wrapper)
    return patched


@dataclass(frozen=True)
class ActiveRange:
    """The part of sampling in which a calibration acts, as ComfyUI percents of the schedule."""

    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"Calibri: need 0 ≤ start_percent ≤ end_percent ≤ 1; got {self.start_percent} and "
                             f"{self.end_percent}.")

    def test(self, model: Any) -> Callable[[dict], bool]:
        """A predicate on transformer_options: is the current sigma inside the range?

        Uses the same window as ComfyUI's SkipLayerGuidanceDiT (σ_end ≤ σ ≤ σ_start), so an SLG
        setting re-expressed as a calibration acts on exactly the same steps.
        """
        if self.start_percent == 0.0 and self.end_percent == 1.0:
            return lambda options: True
        sampling = model.get_model_object("model_sampling")
        sigma_start = float(sampling.percent_to_sigma(self.start_percent))
        sigma_end = float(sampling.percent_to_sigma(self.end_percent))

        def inside(options: dict) -> bool:
            sigmas = options.get("sigmas")
            if sigmas is None:
                return True
            sigma = float(sigmas.reshape(-1)[0])
            return sigma_end <= sigma <= sigma_start

        return inside


def apply_calibration(model: Any, calibration: Calibration, *, strength: float = 1.0,
                      active_range: ActiveRange = ActiveRange()) -> Any:
    """Apply a one-member calibration to a clone of ``model`` (the CalibriApply node's engine).

    Every row gets the member's scales s' = 1 + strength·(s − 1) and output weight
    ω' = 1 + strength·(ω − 1) inside ``active_range``; outside it the model runs unscaled.

    Raises:
        ValueError: the calibration has several members, or does not fit the model (family, sites).
    """
    if len(calibration.members) != 1:
        raise ValueError(f"Calibri: this calibration has {len(calibration.members)} members; applying it to a MODEL "
                         "needs exactly one. Use CalibriEnsemble (KSampler) or CalibriEnsembleGuider "
                         "(SamplerCustomAdvanced) for ensembles.")
    _, layout = model_layout(model)
    gates = torch.tensor(calibration.gate_scales(layout), dtype=torch.float32)
    row = 1 + strength * (gates - 1)
    weight = torch.tensor([1 + strength * (calibration.members[0].weight - 1)], dtype=torch.float32)
    inside = active_range.test(model)
    return apply_row_scales(model, lambda options, batch: row if inside(options) else None,
                            output_weight=lambda options, batch: weight if inside(options) else None)


# --- ensembles: one batch row per member ------------------------------------------------------------------------

MEMBER_ROWS = "calibri_member_rows"
"""transformer_options key: a [conds, gates] table; row j scales the forward of conds-list entry j."""


def _member_rows(options: dict, batch: int) -> Optional[torch.Tensor]:
    table = options.get(MEMBER_ROWS)
    if table is None:
        return None
    # calc_cond_batch tags every chunk of the batch with the index of its cond in the list it was given
    # (cond_or_uncond); chunks may come in any order and several calls (comfyui.md C).
    indices = options["cond_or_uncond"]
    return table[list(indices)].repeat_interleave(batch // len(indices), dim=0)


def enable_member_rows(model: Any) -> Any:
    """A clone of ``model`` whose forwards take per-cond gate rows from ``MEMBER_ROWS``."""
    return apply_row_scales(model, _member_rows)


def _with_member_rows(model_options: dict, rows: torch.Tensor) -> dict:
    options = dict(model_options)
    options["transformer_options"] = dict(options.get("transformer_options", {}), **{MEMBER_ROWS: rows})
    return options


def denoise_terms(model: Any, conds: list, rows: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor,
                  model_options: dict, low_vram: bool = False) -> list[torch.Tensor]:
    """x0 of every (cond, gate row) pair, through ComfyUI's own cond batching.

    By default all pairs go to one ``calc_cond_batch`` call, which packs them into as few forwards as
    memory allows (one batch row per pair); ``low_vram`` runs one pair at a time.
    """
    import comfy.samplers

    if low_vram:
        return [comfy.samplers.calc_cond_batch(model, [cond], x, timestep,
                                               _with_member_rows(model_options, rows[i:i + 1]))[0]
                for i, cond in enumerate(conds)]
    return comfy.samplers.calc_cond_batch(model, conds, x, timestep, _with_member_rows(model_options, rows))
