"""How the one mechanism spends memory and device work: multipliers built once, branch outputs scaled in place."""

from __future__ import annotations

import tiny_models as tm
import torch
from site_checks import SIGMA, gate_calibration

from calibri_core import Calibration, Member
from calibri_core.host import _ActiveRows, _scaled_forward, apply_calibration, model_layout
from calibri_core.sites import Gate

BRANCH = [(0, Gate("blocks.0", "", "mlp", "blocks.0.ffn"))]  # chunks == 1: the output is the gated branch


def _active(scale: float) -> _ActiveRows:
    active = _ActiveRows()
    active.set(torch.tensor([[scale]]), torch.device("cpu"))
    return active


def test_a_fresh_branch_output_is_scaled_in_place():
    produced = []

    def original(x):
        produced.append(x * 2)
        return produced[-1]

    x = torch.ones(2, 3)
    out = _scaled_forward(original, _active(1.5), BRANCH, "blocks.0.ffn", False)(x)
    assert out is produced[0], "the scaled branch must be the module's own output tensor, not a copy"
    assert torch.equal(out, torch.full((2, 3), 3.0)) and torch.equal(x, torch.ones(2, 3))


def test_outputs_that_alias_an_input_a_view_or_autograd_are_not_touched_in_place():
    x = torch.ones(2, 3)
    for original in (lambda t: t, lambda t: t[:, :2], lambda t: t.view(3, 2)):
        out = _scaled_forward(original, _active(1.5), BRANCH, "blocks.0.ffn", False)(x)
        assert torch.equal(x, torch.ones(2, 3)), "an input must never be modified"
        assert float(out.max()) == 1.5
    leaf = torch.ones(2, 3, requires_grad=True)
    out = _scaled_forward(lambda t: t * 2, _active(1.5), BRANCH, "blocks.0.ffn", False)(leaf)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.full((2, 3), 3.0))


def _count_builds(monkeypatch) -> list:
    builds = []
    original = _ActiveRows.factor

    def counting(self, key, build):
        if key not in self._factors:
            builds.append(key[0])
        return original(self, key, build)

    monkeypatch.setattr(_ActiveRows, "factor", counting)
    return builds


def test_a_static_calibration_builds_each_multiplier_once_per_run(monkeypatch):
    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    modules = {g.module for g in layout.gates}
    builds = _count_builds(monkeypatch)
    tm.sample(apply_calibration(patcher, gate_calibration(layout, [1.2] * len(layout.gates))), "flux", steps=4)
    assert sorted(builds) == sorted(modules), "one build per patched module for the whole run"


def test_an_ensemble_builds_each_multiplier_at_most_once_per_forward(monkeypatch):
    from calibri_core.sampling import EnsembleGuider

    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    calibration = Calibration(layout.family, "gate", layout.site_names("gate"),
                              (Member((1.2,) * n, 2.0, "positive"), Member((0.8,) * n, -1.0, "negative")))
    forwards = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    builds = _count_builds(monkeypatch)
    try:
        tm.predict(None, tm.latent("flux"), SIGMA, tm.conditioning("flux"), tm.conditioning("flux", seed=9),
                   guider=EnsembleGuider(patcher, calibration))
    finally:
        handle.remove()
    modules = {g.module for g in layout.gates}
    assert len(forwards) == 1, "both members in one batched forward"
    assert sorted(builds) == sorted(modules) * len(forwards)
