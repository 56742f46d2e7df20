"""Checks every family and variant test makes on its tiny model: one implementation, so they cannot drift apart."""

from __future__ import annotations

from typing import Callable

import tiny_models as tm
import torch

from calibri_core import Calibration, Member
from calibri_core.host import apply_calibration, apply_row_scales, model_layout

SIGMA = 0.7
ATOL = 1e-5
MOVES = 1e-4  # the tiny models' outputs are O(1): a live gate at 1.6-1.7 moves them by more than this


def family_setup(spec_name: str) -> tuple:
    """(spec name, tiny patcher, layout): what the ensemble tests' ``setup`` fixture gives each family."""
    patcher = tm.build_patcher(spec_name)
    _, layout = model_layout(patcher)
    return spec_name, patcher, layout


def record_forward(module, store: dict, key: str):
    """A forward hook that keeps ``module``'s (args, output) in ``store[key]``; returns the hook handle."""
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, (args, out)))


def gate_calibration(layout, scales) -> Calibration:
    """A one-member calibration with one scale per gate."""
    return Calibration(layout.family, "gate", layout.site_names("gate"), (Member(tuple(scales)),))


def one_gate(layout, index: int, scale: float) -> Calibration:
    """Gate ``index`` at ``scale``, every other gate at 1."""
    scales = [1.0] * len(layout.gates)
    scales[index] = scale
    return gate_calibration(layout, scales)


def assert_identity_is_bit_identical(patcher, x, positive, base, predict: Callable = tm.predict) -> None:
    _, layout = model_layout(patcher)
    for granularity in ("block", "layer", "gate"):
        calibrated = apply_calibration(patcher, Calibration.identity(layout, granularity))
        assert torch.equal(predict(calibrated, x, SIGMA, positive), base), granularity


def assert_every_gate_matches_its_reference(patcher, x, positive, base, reference: Callable[[dict], object],
                                            scale: float, predict: Callable = tm.predict) -> None:
    """Each gate alone at ``scale`` moves the prediction and equals ``reference({index: scale})``'s."""
    _, layout = model_layout(patcher)
    for index, gate in enumerate(layout.gates):
        ours = predict(apply_calibration(patcher, one_gate(layout, index, scale)), x, SIGMA, positive)
        expected = predict(reference({index: scale}), x, SIGMA, positive)
        site = gate.name("gate")
        assert (ours - base).abs().max() > MOVES, f"{site} has no effect"
        assert (expected - base).abs().max() > MOVES, f"the reference of {site} has no effect"
        assert (ours - expected).abs().max() <= ATOL, site


def assert_rows_carry_their_calibrations(patcher, rows: torch.Tensor, x, positive,
                                         predict: Callable = tm.predict) -> None:
    """A batch whose rows carry different scales equals each row run alone with its own calibration."""
    _, layout = model_layout(patcher)
    both = predict(apply_row_scales(patcher, lambda options, batch: rows), x, SIGMA, positive)
    for i in range(rows.shape[0]):
        alone = predict(apply_calibration(patcher, gate_calibration(layout, rows[i].tolist())), x[i:i + 1], SIGMA,
                        positive)
        assert (alone - predict(patcher, x[i:i + 1], SIGMA, positive)).abs().max() > MOVES, f"row {i} had no effect"
        assert (both[i:i + 1] - alone).abs().max() <= ATOL, i
