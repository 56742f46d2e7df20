"""Ensembles inside ComfyUI's samplers (paper §3.3): a GUIDER for SamplerCustomAdvanced and a MODEL
patch for the plain KSampler. Both run every pass an ensemble step needs through one batched
``calc_cond_batch`` call, with one gate row per pass (``denoise_terms``), and combine them with
``calibri_core.ensemble``'s arithmetic, as the search's evaluator does.

Imports ComfyUI at module level: import it only where ComfyUI is present (nodes, search).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

import comfy.samplers
import torch

from .calibration import Calibration
from .ensemble import Term, combine_x0, first_positive_member, plan_terms, rescale_reference, rescale_x0
from .host import ActiveRange, apply_row_scales, model_layout, token_patch

# --- one batch row per member -------------------------------------------------------------------------------------

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


def _own_identity(cond: list, member: int) -> list:
    """``cond`` (a processed conditioning list) with uuids of its own for the pass of ``member``.

    ComfyUI gives every entry of a conditioning one uuid, and caches (EasyCache, LazyCache) keep one result per
    uuid; ensemble passes on one prompt must not share it, or a cache hands one member's result to all of them.
    The new uuid is derived, so the same pass keeps the same identity at every step.
    """
    if member < 0:
        return cond
    return [dict(c, uuid=uuid.uuid5(c["uuid"], f"calibri-member-{member}")) if isinstance(c.get("uuid"), uuid.UUID)
            else c for c in cond]


def denoise_terms(model: Any, conds: list, rows: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor,
                  model_options: dict, low_vram: bool = False, members: Optional[list[int]] = None,
                  calc: Optional[Callable] = None) -> list[torch.Tensor]:
    """x0 of every (cond, gate row) pair, through ComfyUI's own cond batching.

    By default all pairs go to one ``calc_cond_batch`` call, which packs them into as few forwards as
    memory allows (one batch row per pair); ``low_vram`` runs one pair at a time. ``members`` (the
    ``Term.member`` of each pair) gives each pair a cond identity of its own. ``calc`` replaces
    ``comfy.samplers.calc_cond_batch`` (a CALC_COND_BATCH wrapper passes its executor).
    """
    calc = comfy.samplers.calc_cond_batch if calc is None else calc
    if members is not None:
        conds = [_own_identity(cond, member) for cond, member in zip(conds, members)]
    if low_vram:
        return [calc(model, [cond], x, timestep, _with_member_rows(model_options, rows[i:i + 1]))[0]
                for i, cond in enumerate(conds)]
    return calc(model, conds, x, timestep, _with_member_rows(model_options, rows))


def _rows(terms: list[Term]) -> torch.Tensor:
    return torch.tensor([t.row for t in terms], dtype=torch.float32)


# --- the two front doors ------------------------------------------------------------------------------------------

# ComfyUI's CFG hooks (model_options keys): each acts on a cond/uncond pair that an exact ensemble does not have.
_CFG_HOOKS = {
    "sampler_calc_cond_batch_function": "replaces the cond/uncond batch",
    "sampler_pre_cfg_function": "edits the cond/uncond predictions before CFG",
    "sampler_cfg_function": "replaces the CFG formula",
    "sampler_post_cfg_function": "edits the result of CFG",
}


def _hook_owner(fn: Any) -> str:
    """Where a hook function was defined, e.g. ``SkipLayerGuidanceDiT.execute (comfy_extras.nodes_slg)``."""
    name = getattr(fn, "__qualname__", type(fn).__qualname__).split(".<locals>")[0]
    return f"{name} ({getattr(fn, '__module__', '?')})"


def _refuse_cfg_hooks(model: Any) -> None:
    """EnsembleGuider samples Σ ω_i f_i itself; a CFG hook on its model would be skipped, so it is refused by name."""
    import comfy.patcher_extension

    found = []
    for key, what in _CFG_HOOKS.items():
        hooks = model.model_options.get(key)
        for fn in (hooks if isinstance(hooks, list) else [hooks] if hooks is not None else []):
            found.append(f"{_hook_owner(fn)}, which {what} ({key})")
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, ENSEMBLE_KEY):
        found.append("CalibriEnsemble, which replaces the KSampler's passes with its own members")
    if found:
        raise ValueError("Calibri: CalibriEnsembleGuider cannot honour " + "; ".join(found) + ". The guider computes "
                         "the ensemble F = Σ ω_i f_i exactly and has no cond/uncond pair for such a node to act on. "
                         "Remove that node from this MODEL, or use CalibriEnsemble with the KSampler, which keeps "
                         "ComfyUI's CFG and its hooks.")


class EnsembleGuider(comfy.samplers.CFGGuider):
    """Samples F = Σ ω_i f_{s_i}(x, t, p_i) exactly, every member on its own prompt.

    Args:
        model: a ComfyUI MODEL of a supported family (not modified).
        calibration: N members; prompts positive|negative select the conditioning each member sees.
        active_range: outside it every member runs uncalibrated with its weight kept.
        rescale: rescale F per token to the norm of the first positive member's prediction, as
            Qwen-Image's true-CFG pipeline does.
        low_vram: run the passes one after another instead of in one batch (same result); always so for a
            family that runs one sample per forward (``Family.single_sample_forward``).
    """

    def __init__(self, model: Any, calibration: Calibration, active_range: ActiveRange = ActiveRange(),
                 rescale: bool = False, low_vram: bool = False):
        family, self.layout = model_layout(model)
        calibration.check_against(self.layout)
        _refuse_cfg_hooks(model)
        if rescale:
            first_positive_member(calibration)  # refuse before sampling, not at the first step
        super().__init__(enable_member_rows(model))
        self.calibration = calibration
        self.active_range = active_range
        self.rescale = rescale
        self.low_vram = low_vram or family.single_sample_forward
        self.patch = token_patch(model)

    def set_conds(self, positive, negative) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        active = self.active_range.contains(timestep, self.inner_model.model_sampling)
        terms = plan_terms(self.calibration, self.layout, active)
        reference = rescale_reference(self.calibration, self.layout, active, terms) if self.rescale else None
        x0s = denoise_terms(self.inner_model, [self.conds.get(t.prompt) for t in terms], _rows(terms), x, timestep,
                            model_options, self.low_vram, members=[t.member for t in terms])
        out = combine_x0(x, x0s, [t.weight for t in terms])
        return out if reference is None else rescale_x0(x, out, x0s[reference], timestep, self.patch)


ENSEMBLE_KEY = "calibri_ensemble"


def apply_ensemble(model: Any, calibration: Calibration, active_range: ActiveRange = ActiveRange()) -> Any:
    """Patch a clone of ``model`` so the KSampler's cond pass becomes Σ ω_i f_{s_i}(x, t, cond) over the
    positive members, and its uncond pass the same over the negative members. A pass with no members
    runs uncalibrated; the KSampler's CFG then combines the two passes as usual.

    It is a CALC_COND_BATCH wrapper, so it composes with anything else that batches conds (a node that sets
    ComfyUI's single ``sampler_calc_cond_batch_function`` slot, such as SkipLayerGuidanceDiTSimple, calls
    ``calc_cond_batch`` and so runs through it, in either order). Which conditioning is positive is read from
    the guider sampling at that moment (a PREDICT_NOISE wrapper), by identity, never by position; a pass
    that is neither (DualCFGGuider's middle) runs uncalibrated.
    """
    import comfy.patcher_extension

    family, layout = model_layout(model)
    calibration.check_against(layout)
    wrappers = comfy.patcher_extension.WrappersMP
    if model.get_wrappers(wrappers.CALC_COND_BATCH, ENSEMBLE_KEY):
        raise ValueError("Calibri: this MODEL already has a CalibriEnsemble; two would each replace the other's "
                         "passes. Join the calibrations with CalibriCombine and use one CalibriEnsemble.")
    patched = enable_member_rows(model)
    identity = (1.0,) * len(layout.gates)
    has_members = {prompt: any(m.prompt == prompt for m in calibration.members) for prompt in ("positive", "negative")}
    roles: dict[int, str] = {}  # id(processed cond list) → "positive" | "negative", while a guider predicts

    def predict_noise_wrapper(executor, *args, **kwargs):
        conds = getattr(executor.class_obj, "conds", None) or {}
        previous = dict(roles)
        roles.clear()
        roles.update({id(conds[role]): role for role in ("positive", "negative") if conds.get(role) is not None})
        try:
            return executor(*args, **kwargs)
        finally:
            roles.clear()
            roles.update(previous)

    def calc_cond_batch_wrapper(executor, inner_model, conds, x, timestep, model_options):
        if not roles:
            raise RuntimeError("Calibri: CalibriEnsemble's model was asked for predictions outside a ComfyUI "
                               "guider's predict_noise, so it cannot tell the positive conditioning from the "
                               "negative. Sample it with KSampler / SamplerCustomAdvanced and a CFG-style guider.")
        active = active_range.contains(timestep, inner_model.model_sampling)
        passes = []
        for cond in conds:
            role = roles.get(id(cond)) if cond is not None else None
            if cond is None:
                passes.append(None)
            elif role is not None and has_members[role]:
                passes.append((cond, plan_terms(calibration, layout, active, prompts={role})))
            else:
                passes.append((cond, [Term(role or "", identity, 1.0)]))
        flat = [(p[0], term) for p in passes if p is not None for term in p[1]]
        x0s = iter(denoise_terms(inner_model, [c for c, _ in flat], _rows([t for _, t in flat]), x, timestep,
                                 model_options, family.single_sample_forward, members=[t.member for _, t in flat],
                                 calc=executor)
                   if flat else [])
        out = []
        for p in passes:
            if p is None:
                out.append(torch.zeros_like(x))  # what calc_cond_batch returns for a skipped (cfg = 1) uncond
            else:
                terms = p[1]
                out.append(combine_x0(x, [next(x0s) for _ in terms], [t.weight for t in terms]))
        return out

    patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, ENSEMBLE_KEY, predict_noise_wrapper)
    patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, ENSEMBLE_KEY, calc_cond_batch_wrapper)
    return patched
