"""CalibriSweep: the identity, then one model per site at the chosen scale; each equals CalibriApply of a
CalibriManual calibration that sets only that site (bit-identical predictions on tiny models)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from calibri_core import comfy_env

pack = comfy_env.import_pack()
nodes = pack.nodes

from calibri_core.host import model_layout  # noqa: E402
from calibri_core.sweep import IDENTITY_LABEL, selected_sites, sweep  # noqa: E402

SIGMA = 0.7


def run_sweep(patcher, granularity="block", scale=0.0, sites=""):
    out = nodes.CalibriSweep.execute(model=patcher, granularity=granularity, scale=scale, sites=sites)
    return out[0], out[1]


def applied(patcher, text, granularity):
    preset = nodes.CalibriManual.execute(model=patcher, granularity=granularity, text=text)[0]
    return nodes.CalibriApply.execute(model=patcher, calibration=preset, strength=1.0, start_percent=0.0,
                                      end_percent=1.0)[0]


@pytest.mark.parametrize("family,granularity,scale", [("flux", "block", 0.0), ("flux", "gate", 1.5),
                                                      ("sd3", "gate", 0.0), ("qwen_image", "layer", 0.0)])
def test_each_entry_is_apply_of_that_one_site(family, granularity, scale):
    patcher = tm.build_patcher(family)
    x, positive = tm.latent(family), tm.conditioning(family)
    models, labels = run_sweep(patcher, granularity, scale)
    sites = model_layout(patcher)[1].site_names(granularity)
    assert labels == [IDENTITY_LABEL] + [f"{site} = {scale:g}" for site in sites]
    assert len(models) == len(labels) and all(m is not patcher for m in models)
    base = tm.predict(patcher, x, SIGMA, positive)
    assert torch.equal(tm.predict(models[0], x, SIGMA, positive), base)
    for site, model in zip(sites, models[1:]):
        expected = tm.predict(applied(patcher, f"{site} = {scale}", granularity), x, SIGMA, positive)
        got = tm.predict(model, x, SIGMA, positive)
        assert torch.equal(got, expected), site
        assert (got - base).abs().max() > 1e-6, f"{site} at {scale} changed nothing"
    assert torch.equal(tm.predict(patcher, x, SIGMA, positive), base)  # the input model is untouched


def test_selection_and_errors():
    patcher = tm.build_patcher("flux")
    layout = model_layout(patcher)[1]
    _, labels = run_sweep(patcher, "block", 0.0, "single_blocks.1, double_blocks.0\n# comment")
    assert labels == [IDENTITY_LABEL, "double_blocks.0 = 0", "single_blocks.1 = 0"]  # model order
    assert selected_sites(layout, "gate", "double_blocks.1") == tuple(
        f"double_blocks.1.{s}.{b}" for s in ("img", "txt") for b in ("attn", "mlp"))
    with pytest.raises(ValueError, match="single_blocks.5 does not exist"):
        sweep(layout, "block", 0.0, "single_blocks.5")
    with pytest.raises(ValueError, match="without values"):
        sweep(layout, "block", 0.0, "single_blocks.1 = 0")
    with pytest.raises(ValueError, match="finite"):
        sweep(layout, "block", float("nan"))
    with pytest.raises(ValueError, match="sets single_blocks.1 again"):
        sweep(layout, "block", 0.0, "single_blocks.0-1, single_blocks.1")


def test_outputs_are_declared_as_lists():
    schema = nodes.CalibriSweep.GET_SCHEMA()
    assert [(o.io_type, o.is_output_list) for o in schema.outputs] == [("MODEL", True), ("STRING", True)]
    assert all(o.tooltip for o in schema.outputs) and all(i.tooltip for i in schema.inputs)
