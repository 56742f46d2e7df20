"""Ensembles inside ComfyUI's samplers (paper §3.3): a GUIDER for SamplerCustomAdvanced and a MODEL
patch for the plain KSampler. Both run every pass an ensemble step needs through one batched
``calc_cond_batch`` call, with one gate row per pass (``host.denoise_terms``).

Imports ComfyUI at module level: import it only where ComfyUI is present (nodes, search).
"""

from __future__ import annotations

from typing import Any

import comfy.samplers
import torch

from .calibration import Calibration
from .ensemble import Term, combine_x0, first_positive_member, plan_terms, rescale_reference, rescale_to
from .host import ActiveRange, denoise_terms, enable_member_rows, model_layout, token_patch

_CALC_COND_BATCH = "sampler_calc_cond_batch_function"


def _velocity(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - x0) / sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def _rows(terms: list[Term]) -> torch.Tensor:
    return torch.tensor([t.row for t in terms], dtype=torch.float32)


class EnsembleGuider(comfy.samplers.CFGGuider):
    """Samples F = Σ ω_i f_{s_i}(x, t, p_i) exactly, every member on its own prompt.

    Args:
        model: a ComfyUI MODEL of a supported family (not modified).
        calibration: N members; prompts positive|negative select the conditioning each member sees.
        active_range: outside it every member runs uncalibrated with its weight kept.
        rescale: rescale F per token to the norm of the first positive member's prediction, as
            Qwen-Image's true-CFG pipeline does.
        low_vram: run the passes one after another instead of in one batch (same result).
    """

    def __init__(self, model: Any, calibration: Calibration, active_range: ActiveRange = ActiveRange(),
                 rescale: bool = False, low_vram: bool = False):
        _, self.layout = model_layout(model)
        calibration.check_against(self.layout)
        if rescale:
            first_positive_member(calibration)  # refuse before sampling, not at the first step
        super().__init__(enable_member_rows(model))
        self.calibration = calibration
        self.inside = active_range.test(model)
        self.rescale = rescale
        self.low_vram = low_vram
        self.patch = token_patch(model)

    def set_conds(self, positive, negative) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        active = self.inside({"sigmas": timestep})
        terms = plan_terms(self.calibration, self.layout, active)
        reference = rescale_reference(self.calibration, self.layout, active, terms) if self.rescale else None
        x0s = denoise_terms(self.inner_model, [self.conds.get(t.prompt) for t in terms], _rows(terms), x, timestep,
                            model_options, self.low_vram)
        out = combine_x0(x, x0s, [t.weight for t in terms])
        if reference is not None:
            sigma = timestep.reshape((-1,) + (1,) * (x.ndim - 1))
            v = rescale_to(_velocity(x, x0s[reference], timestep), _velocity(x, out, timestep), self.patch)
            out = x - sigma * v
        return out


def apply_ensemble(model: Any, calibration: Calibration, active_range: ActiveRange = ActiveRange()) -> Any:
    """Patch a clone of ``model`` so the KSampler's cond pass becomes Σ ω_i f_{s_i}(x, t, cond) over the
    positive members, and its uncond pass the same over the negative members. A pass with no members
    runs uncalibrated; the KSampler's CFG then combines the two passes as usual.
    """
    _, layout = model_layout(model)
    calibration.check_against(layout)
    if _CALC_COND_BATCH in model.model_options:
        raise ValueError("Calibri: another node already replaced ComfyUI's cond batching on this model (e.g. "
                         "SkipLayerGuidanceDiTSimple); CalibriEnsemble must own it. Put CalibriEnsemble before that "
                         "node, or use CalibriEnsembleGuider.")
    patched = enable_member_rows(model)
    inside = active_range.test(model)
    identity = (1.0,) * len(layout.gates)
    has_members = {prompt: any(m.prompt == prompt for m in calibration.members) for prompt in ("positive", "negative")}

    def calc_cond_batch(args: dict) -> list:
        x, sigma = args["input"], args["sigma"]
        active = inside({"sigmas": sigma})
        passes = []
        for cond, prompt in zip(args["conds"], ("positive", "negative")):
            if cond is None:
                passes.append(None)
            elif has_members[prompt]:
                passes.append((cond, plan_terms(calibration, layout, active, prompts={prompt})))
            else:
                passes.append((cond, [Term(prompt, identity, 1.0)]))
        flat = []
        for p in passes:
            if p is not None:
                flat += [(p[0], term) for term in p[1]]
        x0s = iter(denoise_terms(args["model"], [c for c, _ in flat], _rows([t for _, t in flat]), x, sigma,
                                 args["model_options"]) if flat else [])
        out = []
        for p in passes:
            if p is None:
                out.append(torch.zeros_like(x))  # what calc_cond_batch returns for a skipped (cfg = 1) uncond
            else:
                terms = p[1]
                out.append(combine_x0(x, [next(x0s) for _ in terms], [t.weight for t in terms]))
        return out

    patched.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    return patched
