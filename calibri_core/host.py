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

    The rows go to the model's device once per forward (``set``), and each patched module builds its multiplier
    from them there with device-side indexing: no host-to-device copy per module. A multiplier is cached for
    the rows tensor it was built from; a static calibration hands the same tensor to every step, so its rows are
    copied and its multipliers built once per sampling run, not per step.
    """

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None  # the rows of the forward in flight, on the model's device
        self._factors: dict[tuple, torch.Tensor] = {}
        self._source: Optional[torch.Tensor] = None  # the last row source tensor copied, and what came of it
        self._copy: tuple[Optional[torch.Tensor], dict] = (None, {})
        # a 0-dim bool on the device while the calibration acts on part of the schedule only: is this call inside?
        self.window: Optional[torch.Tensor] = None

    def state(self) -> tuple:
        return self.rows, self._factors, self.window

    def restore(self, state: tuple) -> None:
        self.rows, self._factors, self.window = state

    def set(self, rows: Optional[torch.Tensor], device: torch.device, window: Optional[torch.Tensor] = None) -> None:
        self.window = window
        if rows is None:
            self.rows = None
            return
        copied, _ = self._copy
        if rows is not self._source or copied is None or copied.device != device:
            self._source = rows
            self._copy = (rows.to(device=device, dtype=torch.float32, non_blocking=True), {})
        self.rows, self._factors = self._copy

    def factor(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._factors:
            self._factors[key] = build()
        return self._factors[key]


class _DeviceIndex:
    """A list of indices as a LongTensor on each device it is asked for (made once per device)."""

    def __init__(self, values: list[int]) -> None:
        self.values = values
        self._on: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = torch.tensor(self.values, dtype=torch.long, device=device)
        return self._on[device]


def _owns(out: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """May ``out`` be scaled in place? Only a fresh tensor: not a view, not one of the inputs, not needed by
    autograd (an op may have saved it for backward)."""
    if out.requires_grad or out._base is not None:
        return False
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return not any(a is out or a.data_ptr() == out.data_ptr() for a in inputs)


def _scaled_forward(original: Callable, active: _ActiveRows, gates: list[tuple[int, Gate]], module: str,
                    stacked_copies: bool, token_rows: bool = False) -> Callable:
    """Wrap one module's forward so that its gate slices are multiplied by the active row scales.

    Where the whole output is the gated branch (``chunks == 1``), a fresh output is multiplied in place: the
    scaled branch costs no second full-size activation.

    ``stacked_copies``: the family may run this module on k stacked copies of the batch ([rows; rows'], as
    Qwen-Image-Edit-2511's zero-timestep reference half); each copy of a row then takes that row's scales.
    ``token_rows``: the family may run this module on each sample's L tokens flattened into consecutive rows (B·L
    rows, as PixelDiT's pixel blocks); each of a sample's rows then takes that sample's scales.
    """
    columns = _DeviceIndex([column for column, _ in gates])
    chunks, groups = gates[0][1].chunks, gates[0][1].groups
    chunk_of = _DeviceIndex([gate.chunk for _, gate in gates])

    def build(out: torch.Tensor) -> torch.Tensor:
        rows = active.rows.to(dtype=out.dtype).index_select(1, columns.on(out.device))
        copies, remainder = divmod(out.shape[0], rows.shape[0])
        if stacked_copies and remainder == 0 and copies > 1:
            rows = rows.repeat(copies, 1)
        per_sample = token_rows and remainder == 0 and copies > 1 and rows.shape[0] > 1
        if rows.shape[0] not in (1, out.shape[0]) and not per_sample:
            raise RuntimeError(f"Calibri: {module} produced a batch of {out.shape[0]} rows but {rows.shape[0]} rows "
                               "of scales were supplied; this model changes its batch inside the blocks.")
        # With token rows a sample's factor row is broadcast over its L rows in forward (out viewed [B, L, ...]),
        # never materialised B·L times.
        ndim = out.ndim + 1 if per_sample else out.ndim
        if chunks == 1:  # the whole output is the gated branch (or the gate): one scale per row
            return rows[:, 0].reshape((-1,) + (1,) * (ndim - 1))
        factor = torch.ones(rows.shape[0], chunks, device=out.device, dtype=out.dtype)
        factor.index_copy_(1, chunk_of.on(out.device), rows)
        factor = factor.repeat_interleave(out.shape[-1] // (chunks * groups), dim=1)
        if groups > 1:  # the same (shift, scale, gate, ...) layout repeated along the last dimension
            factor = factor.repeat(1, groups)
        return factor.reshape((factor.shape[0],) + (1,) * (ndim - 2) + (out.shape[-1],))

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        if active.rows is None:
            return out
        key = (module, out.device, out.dtype, out.ndim, out.shape[0], out.shape[-1])
        factor = active.factor(key, lambda: build(out))
        if active.window is not None:  # decided on the device: ×1 (exact) outside the window, no host read
            factor = torch.where(active.window, factor, 1.0)
        shaped = out
        if factor.ndim > out.ndim:  # token rows: [B·L, ...] seen as [B, L, ...] against one factor row per sample
            shaped = out.view((factor.shape[0], -1) + tuple(out.shape[1:]))
        if chunks == 1 and _owns(out, args, kwargs):
            shaped.mul_(factor)
            return out
        return (shaped * factor).view(out.shape)

    return forward


_FIRST_ROWS: "weakref.WeakKeyDictionary[Any, Optional[torch.Tensor]]" = weakref.WeakKeyDictionary()


def _check_cached_rows(key: str, cache: Any, rows: Optional[torch.Tensor], partial: bool = False) -> None:
    """Refuse scales that a row cache (see ``Family.row_caches``) would drop: rows that differ from each other, or
    from the first call that filled the cache (an active range that starts or ends mid-run, a varying ensemble)."""
    if rows is not None and partial:
        raise RuntimeError(f"Calibri: ComfyUI's {key!r} (set by a cache node on this MODEL) computes part of the "
                           "model at the first step and reuses it, so a calibration that acts on part of the "
                           "schedule only would keep the first step's state there. Remove the cache node, or set "
                           "start_percent 0 and end_percent 1.")
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


def apply_row_scales(model: Any, row_source: RowSource, *, output_weight: Optional[Callable] = None,
                     active_range: "ActiveRange | None" = None) -> Any:
    """Clone ``model`` so every forward multiplies each gate by per-row scales.

    Args:
        model: a ComfyUI ModelPatcher of a supported family; it is not modified.
        row_source: called once per model call with ``(transformer_options, batch_size)``; returns a
            ``[1 or batch, gates]`` tensor in the layout's gate order, or None to run unscaled.
        output_weight: optional ``(transformer_options, batch_size) → [1 or batch] tensor | None``;
            multiplies the model's output (velocity) per row, paper §3.3's ω.
        active_range: outside it the model runs unscaled (default: the whole schedule).

    Returns:
        The patched clone.
    """
    family, layout = model_layout(model)
    active_range = ActiveRange() if active_range is None else active_range
    patched = model.clone()
    active = _ActiveRows()
    by_module: dict[str, list[tuple[int, Gate]]] = {}
    for column, gate in enumerate(layout.gates):
        by_module.setdefault(gate.module, []).append((column, gate))
    for module, gates in by_module.items():
        key = f"diffusion_model.{module}.forward"
        patched.add_object_patch(key, _scaled_forward(patched.get_model_object(key), active, gates, module,
                                                      family.stacked_batch_copies, family.token_rows))

    def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        # Inside the range or not, on the schedule as this call samples it (shift nodes before or after included),
        # decided on the device; rows and weights are host tensors, so nothing here waits for the device.
        window = active_range.window(transformer_options.get("sigmas"), executor.class_obj.model_sampling)
        rows = row_source(transformer_options, x.shape[0])
        if rows is not None and bool(torch.all(rows == 1)):
            rows = None  # identity: leave the forward bit-identical and free
        for key in family.row_caches:
            if transformer_options.get(key) is not None:
                _check_cached_rows(key, transformer_options[key], rows, partial=window is not None)
        previous = active.state()
        active.set(rows, x.device, window)
        try:
            denoised = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            active.restore(previous)
        weight = output_weight(transformer_options, x.shape[0]) if output_weight else None
        if weight is None or bool(torch.all(weight == 1)):
            return denoised
        # Flow models return x0 = x − σ·v; scaling v by ω is x + ω·(x0 − x) (see comfyui.md C).
        weight = weight.to(denoised).reshape((-1,) + (1,) * (denoised.ndim - 1))
        weighted = x + weight * (denoised - x)
        return weighted if window is None else torch.where(window, weighted, denoised)

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

    def contains(self, sigmas: Optional[torch.Tensor], model_sampling: Any) -> bool:
        """Is the step at ``sigmas`` (the current timestep tensor) inside the range?

        The percents are read on ``model_sampling`` as sampling uses it at this call, so a shift node placed
        before or after the calibration moves the window the same way (ComfyUI's own cond ranges work so).
        The window is SkipLayerGuidanceDiT's (σ_end ≤ σ ≤ σ_start), so an SLG setting re-expressed as a
        calibration acts on exactly the same steps.
        """
        inside = self.window(sigmas, model_sampling)
        return True if inside is None else bool(inside)  # the one host read a partial window costs

    def window(self, sigmas: Optional[torch.Tensor], model_sampling: Any) -> Optional[torch.Tensor]:
        """``contains`` decided on the device, without waiting for it: a 0-dim bool tensor, or None for the whole
        schedule (the bounds are read once per schedule, not per step). ``contains`` reads this one."""
        if (self.start_percent == 0.0 and self.end_percent == 1.0) or sigmas is None:
            return None
        sigma_start, sigma_end = self._bounds(model_sampling)
        sigma = sigmas.reshape(-1)[0]
        return (sigma >= sigma_end) & (sigma <= sigma_start)

    def _bounds(self, model_sampling: Any) -> tuple[float, float]:
        try:
            cached = _RANGE_BOUNDS.get(model_sampling, {})
        except TypeError:  # not weak-referenceable
            cached = {}
        if self not in cached:
            cached[self] = (float(model_sampling.percent_to_sigma(self.start_percent)),
                            float(model_sampling.percent_to_sigma(self.end_percent)))
            try:
                _RANGE_BOUNDS[model_sampling] = cached
            except TypeError:
                pass
        return cached[self]


_RANGE_BOUNDS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
"""model_sampling object → {ActiveRange: (σ_start, σ_end)}: percent_to_sigma once per schedule, not per step."""


def apply_calibration(model: Any, calibration: Calibration, *, strength: float = 1.0,
                      active_range: ActiveRange = ActiveRange()) -> Any:
    """Apply a one-member calibration to a clone of ``model`` (the CalibriApply node's engine).

    Every row gets the member's scales s' = 1 + strength·(s − 1) and output weight
    ω' = 1 + strength·(ω − 1) inside ``active_range``; outside it the model runs unscaled.

    Raises:
        ValueError: the calibration has several members, does not fit the model (family, sites), or ``strength``
            is not finite or takes a scale or ω out of ``calibration.SCALE_LIMIT`` / ``WEIGHT_LIMIT``.
    """
    if len(calibration.members) != 1:
        raise ValueError(f"Calibri: this calibration has {len(calibration.members)} members; applying it to a MODEL "
                         "needs exactly one. Use CalibriEnsemble (KSampler) or CalibriEnsembleGuider "
                         "(SamplerCustomAdvanced) for ensembles.")
    calibration.check_strength(strength)
    _, layout = model_layout(model)
    gates = torch.tensor(calibration.gate_scales(layout), dtype=torch.float32)
    row = 1 + strength * (gates - 1)
    weight = torch.tensor([1 + strength * (calibration.members[0].weight - 1)], dtype=torch.float32)
    return apply_row_scales(model, lambda options, batch: row, output_weight=lambda options, batch: weight,
                            active_range=active_range)

