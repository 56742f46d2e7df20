"""Ensemble arithmetic (paper §3.3): which forward passes an ensemble needs and how they combine.

F(x, t) = Σ_i ω_i · f_{s_i}(x, t, p_i) in the model's output space (velocity). ComfyUI's model calls
return x0 = x − σ·v, where the same ensemble is x0_F = x + Σ_i ω_i (x0_i − x) for any Σω
(comfyui.md C); a naive Σ ω_i x0_i would be off by (Σω − 1)·x.
Pure torch; no ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .calibration import Calibration
from .sites import SiteLayout


@dataclass(frozen=True)
class Term:
    """One forward pass of an ensemble step: a prompt, the gate scales of its row, and its weight.

    ``member`` is the index of the first member the pass computes (-1: no member, the plain model pass); it names
    the pass across steps wherever a pass needs an identity of its own (caches keyed by cond uuid).
    """

    prompt: str
    row: tuple[float, ...]
    weight: float
    member: int = -1


def plan_terms(calibration: Calibration, layout: SiteLayout, active: bool, prompts=None) -> list[Term]:
    """The distinct passes one step needs.

    Inside the active range every member runs with its own scales; outside it every member runs
    uncalibrated with its weight kept. Members that are then identical (same prompt, same scales)
    are computed once with their weights summed, and a pass whose weight is exactly 0 is skipped
    (as the reference does for ω = 0).

    Args:
        prompts: only members whose prompt is in this collection (default: all).
    """
    gates = len(layout.gates)
    rows = calibration.gate_scales(layout) if active else [[1.0] * gates for _ in calibration.members]
    merged: dict[tuple[str, tuple[float, ...]], float] = {}
    first: dict[tuple[str, tuple[float, ...]], int] = {}
    for index, (member, row) in enumerate(zip(calibration.members, rows)):
        if prompts is not None and member.prompt not in prompts:
            continue
        key = (member.prompt, tuple(row))
        merged[key] = merged.get(key, 0.0) + member.weight
        first.setdefault(key, index)
    return [Term(prompt, row, weight, first[(prompt, row)]) for (prompt, row), weight in merged.items()
            if weight != 0.0]


def first_positive_member(calibration: Calibration) -> int:
    """Index of the member whose prediction sets the norm of a rescaled ensemble (Qwen-Image true-CFG).

    Raises:
        ValueError: no member sees the positive prompt.
    """
    first = next((i for i, m in enumerate(calibration.members) if m.prompt == "positive"), None)
    if first is None:
        raise ValueError("Calibri: rescale needs a member on the positive prompt, whose prediction sets the norm.")
    return first


def rescale_reference(calibration: Calibration, layout: SiteLayout, active: bool, terms: list[Term]) -> int:
    """Index in ``terms`` of the pass whose velocity norm a rescaled ensemble keeps: the first positive member's.

    When merging left it out (its weights summed to 0) it is appended with weight 0, evaluated for its norm only.
    """
    first = first_positive_member(calibration)
    row = tuple(calibration.gate_scales(layout)[first]) if active else (1.0,) * len(layout.gates)
    for i, term in enumerate(terms):
        if (term.prompt, term.row) == ("positive", row):
            return i
    terms.append(Term("positive", row, 0.0, first))
    return len(terms) - 1


def combine_x0(x: torch.Tensor, x0s: Sequence[torch.Tensor], weights: Sequence[Union[float, torch.Tensor]],
               pairs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """x0 of Σ ω_i f_i given each pass's x0: x + Σ_i ω_i (x0_i − x), exact for flow models whatever Σω is.

    A row of ``x`` whose only pass has ω exactly 1 takes that pass's x0 itself, bit-identical to the plain model.

    Args:
        x: the sampler's input, [B, ...].
        x0s: the x0 of each forward pass; [B, ...] row for row with ``x``, or [n_i, ...] rows as ``pairs`` says.
        weights: ω of each pass: a number for all its rows, or a [n_i] tensor (one per row).
        pairs: for each pass, the row of ``x`` that each of its rows adds into (a [n_i] LongTensor, on the CPU
            or x's device; several rows may add into one). None: every pass covers the batch row for row.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    everywhere = torch.arange(x.shape[0])
    delta = torch.zeros_like(x)
    passes = torch.zeros(x.shape[0], dtype=torch.long)  # per row of x, on the CPU: no device sync to decide
    unit = torch.zeros(x.shape[0], dtype=torch.bool)     # rows that have a pass of weight exactly 1
    unit_x0 = None
    for i, (x0, weight) in enumerate(zip(x0s, weights)):
        weight = torch.as_tensor(weight, dtype=torch.float64)
        if pairs is None:
            rows = everywhere
            delta += weight.to(x0).reshape(shape) * (x0 - x)
        else:
            rows, index = pairs[i].cpu(), pairs[i].to(x.device)
            delta.index_add_(0, index, weight.to(x0).reshape(shape) * (x0 - x[index]))
        passes.index_add_(0, rows, torch.ones_like(rows))
        one = (weight == 1).expand(rows.shape[0])
        if bool(one.any()):
            unit_x0 = torch.zeros_like(x) if unit_x0 is None else unit_x0
            unit_x0[rows[one].to(x.device)] = x0[one.to(x.device)]
            unit[rows[one]] = True
    out = x + delta
    lone = unit & (passes == 1)
    if bool(lone.any()):
        out = torch.where(lone.to(x.device).reshape(shape), unit_x0, out)
    return out


def token_norm(v: torch.Tensor, patch: int) -> torch.Tensor:
    """Norm over the channels of each patch token ([B, C, (T,) H, W] latents; patch×patch pixels per token).

    Qwen-Image's pipeline takes the norm over the last dimension of its packed tokens, which holds the
    C channels of a patch×patch square; this is the same norm on ComfyUI's unpacked latent.
    """
    *lead, height, width = v.shape
    tokens = v.reshape(*lead, height // patch, patch, width // patch, patch)
    norms = tokens.pow(2).sum(dim=(1, -3, -1), keepdim=True).sqrt()
    return norms.expand_as(tokens).reshape(v.shape)


def rescale_to(reference_v: torch.Tensor, v: torch.Tensor, patch: int) -> torch.Tensor:
    """Rescale v so every token has the norm of the reference velocity's token (Qwen-Image true-CFG)."""
    return v * (token_norm(reference_v, patch) / token_norm(v, patch))


def rescale_x0(x: torch.Tensor, x0: torch.Tensor, reference_x0: torch.Tensor, sigma: torch.Tensor,
               patch: int) -> torch.Tensor:
    """x0 of the combined prediction ``x0`` rescaled so that its velocity v = (x − x0)/σ has, in every token, the
    norm of the velocity of ``reference_x0`` (Qwen-Image true-CFG; σ: [1] or [B])."""
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return x - sigma * rescale_to((x - reference_x0) / sigma, (x - x0) / sigma, patch)
