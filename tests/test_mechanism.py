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


class _DeviceSide(torch.Tensor):
    """Tensors that would live on the GPU in a real run (the latent, sigmas and everything computed from them).

    Reading one into Python (``bool``, ``float``, ``item``, ...) would wait for the device; each such read made by
    Calibri's code is recorded with where it happened. Host tables (scale rows, weights) stay plain tensors.
    """

    reads: list = []
    _READS = {torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
              torch.Tensor.item, torch.Tensor.tolist}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._READS:
            import inspect

            ours = [f"{frame.filename.rsplit('/', 1)[-1]}:{frame.function}" for frame in inspect.stack()[1:8]
                    if "/calibri_core/" in frame.filename]
            if ours:
                cls.reads.append(ours[0])
        return super().__torch_function__(func, types, args, kwargs or {})


def _device_side_sample(model, family="flux", steps=3, guider=None):
    import comfy.sample
    import comfy.samplers

    empty = torch.zeros((1,) + tm.SPECS[family].latent)
    noise = comfy.sample.prepare_noise(empty, 0).as_subclass(_DeviceSide)
    positive, negative = tm.conditioning(family, seed=11), tm.conditioning(family, seed=12)
    _DeviceSide.reads = []
    with torch.no_grad():
        if guider is None:
            comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative,
                                empty.as_subclass(_DeviceSide), seed=0, disable_pbar=True)
        else:
            guider.set_conds(positive, negative)
            sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                                     "simple", steps)
            guider.sample(noise, empty.as_subclass(_DeviceSide), comfy.samplers.sampler_object("euler"), sigmas,
                          seed=0, disable_pbar=True)
    return list(_DeviceSide.reads)


def test_calibri_apply_never_waits_for_the_device_in_a_step():
    from calibri_core.host import ActiveRange

    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    calibration = gate_calibration(layout, [1.2] * len(layout.gates))
    for window in (ActiveRange(), ActiveRange(0.2, 0.6)):
        assert _device_side_sample(apply_calibration(patcher, calibration, active_range=window)) == [], window


def test_ensembles_wait_for_the_device_only_to_decide_a_partial_window():
    """With the whole schedule, no read. With a partial window, one read of the step's sigma per guider call: which
    passes run outside the window (members merged, uncalibrated) is a host decision; reading it on the device
    instead would mean running every member at every step."""
    from calibri_core.host import ActiveRange
    from calibri_core.sampling import EnsembleGuider, apply_ensemble

    patcher = tm.build_patcher("flux")
    _, layout = model_layout(patcher)
    n = len(layout.gates)
    calibration = Calibration(layout.family, "gate", layout.site_names("gate"),
                              (Member((1.2,) * n, 1.5, "positive"), Member((0.8,) * n, -0.5, "positive")))
    assert _device_side_sample(apply_ensemble(patcher, calibration)) == []
    assert _device_side_sample(None, guider=EnsembleGuider(patcher, calibration)) == []
    reads = _device_side_sample(None, steps=3, guider=EnsembleGuider(patcher, calibration, ActiveRange(0.2, 0.6)))
    assert reads == ["host.py:contains"] * 3
