"""Calibri stacked with the nodes users stack on the same MODEL, in any order, through ComfyUI's real samplers.

Each test name states the invariant its cell must hold:
* ``order_independent``: the graph with the other node before our node samples the same image as with it after;
* ``equals_*``: the result equals a reference built by hand from parts proven elsewhere;
* ``refused``: the combination cannot be honoured, and sampling is refused with a message that names the other node.

Rows: CalibriApply (``apply``), CalibriEnsemble for the KSampler (``ensemble``), CalibriEnsembleGuider (``guider``).
Columns: EasyCache, LazyCache, ModelSamplingFlux / SD3 / AuraFlow, SkipLayerGuidanceDiT, SkipLayerGuidanceDiTSimple,
SkipLayerGuidanceSD3, a LoRA, TorchCompileModel, RescaleCFG and a post-CFG function.
All on tiny random-weight models (FLUX.1 for cfg 1, SD3 for CFG), CPU, fp32.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from calibri_core import Calibration, Member
from calibri_core.host import ActiveRange, apply_calibration, model_layout

STEPS = 8
SAME = 1e-6  # two graphs that should be the same computation
CLOSE = 2e-5  # a hand-built reference that reorders the arithmetic


# ---------------------------------------------------------------- ComfyUI's nodes, called as the graph calls them

def _v3(node, **inputs):
    return node.execute(**inputs)[0]


def easycache(model):
    from comfy_extras.nodes_easycache import EasyCacheNode

    # a threshold high enough that the tiny model's steps are skipped: the cell must see the cache act
    return _v3(EasyCacheNode, model=model, reuse_threshold=5.0, start_percent=0.0, end_percent=1.0, verbose=False)


def lazycache(model):
    from comfy_extras.nodes_easycache import LazyCacheNode

    return _v3(LazyCacheNode, model=model, reuse_threshold=5.0, start_percent=0.0, end_percent=1.0, verbose=False)


def shift_flux(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    return ModelSamplingFlux().patch(model, max_shift=1.15, base_shift=0.5, width=1024, height=1024)[0]


def shift_sd3(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift=6.0)[0]


def shift_auraflow(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    return ModelSamplingAuraFlow().patch_aura(model, shift=4.0)[0]


def slg_dit(model):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    return _v3(SkipLayerGuidanceDiT, model=model, scale=3.0, start_percent=0.0, end_percent=1.0, double_layers="1",
               single_layers="0", rescaling_scale=0.0)


def slg_dit_simple(model):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

    return _v3(SkipLayerGuidanceDiTSimple, model=model, start_percent=0.0, end_percent=1.0, double_layers="1",
               single_layers="")


def slg_sd3(model):
    from comfy_extras.nodes_sd3 import SkipLayerGuidanceSD3

    return _v3(SkipLayerGuidanceSD3, model=model, layers="1", scale=3.0, start_percent=0.0, end_percent=1.0)


def lora(model):
    """A real LoRA (lora_up/lora_down on one attention projection) loaded through comfy.sd.load_lora_for_models."""
    import comfy.sd

    dm = model.model.diffusion_model
    key = "double_blocks.0.img_attn.qkv" if hasattr(dm, "double_blocks") else "joint_blocks.0.x_block.attn.qkv"
    weight = model.get_model_object(f"diffusion_model.{key}").weight
    g = torch.Generator().manual_seed(5)
    lora_sd = {f"diffusion_model.{key}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=g) * 0.3,
               f"diffusion_model.{key}.lora_down.weight": torch.randn(2, weight.shape[1], generator=g) * 0.3}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
    return patched


def torch_compile(model):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    # "eager" runs TorchDynamo's capture without a code generator: the node's real path, and it works on CPU
    return _v3(TorchCompileModel, model=model, backend="eager")


def rescale_cfg(model):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    return RescaleCFG().patch(model, multiplier=0.7)[0]


def post_cfg(model):
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * 0.9 + args["input"] * 0.1)
    return patched


# ---------------------------------------------------------------- our nodes' engines and the samplers

FAMILY_OF = {"flux": 1.0, "sd3": 4.5}  # family → the cfg its cells sample with


def _scales(n, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple((0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)).tolist())


def _patcher(family):
    return tm.build_patcher(family, depth=2) if family == "flux" else tm.build_patcher(family)


def one_member(layout, seed=1):
    return Calibration(layout.family, "gate", layout.site_names("gate"), (Member(_scales(len(layout.gates), seed)),))


def two_members(layout, second_prompt="positive"):
    n = len(layout.gates)
    return Calibration(layout.family, "gate", layout.site_names("gate"),
                       (Member(_scales(n, 1), 1.6, "positive"), Member(_scales(n, 2), -0.6, second_prompt)))


def sample(model, family, cfg, positive=None, negative=None):
    import comfy.sample

    empty = torch.zeros((1,) + tm.SPECS[family].latent)
    noise = comfy.sample.prepare_noise(empty, 0)
    positive = positive if positive is not None else tm.conditioning(family, seed=11)
    negative = negative if negative is not None else tm.conditioning(family, seed=12)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative, empty, seed=0,
                                   disable_pbar=True)


def sample_guider(guider, family, positive, negative):
    import comfy.sample
    import comfy.samplers

    empty = torch.zeros((1,) + tm.SPECS[family].latent)
    noise = comfy.sample.prepare_noise(empty, 0)
    guider.set_conds(positive, negative)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", STEPS)
    with torch.no_grad():
        return guider.sample(noise, empty, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)


def apply(model, layout, window=ActiveRange()):
    return apply_calibration(model, one_member(layout), active_range=window)


def ensemble(model, calibration, window=ActiveRange()):
    from calibri_core.sampling import apply_ensemble

    return apply_ensemble(model, calibration, window)


def guider(model, calibration, window=ActiveRange()):
    from calibri_core.sampling import EnsembleGuider

    return EnsembleGuider(model, calibration, window)


def _max(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------- caches: every ensemble pass keeps its own identity

CACHES = {"easycache": easycache, "lazycache": lazycache}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_apply_with_cache_is_order_independent(cache):
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    before = sample(apply(CACHES[cache](patcher), layout), "flux", 1.0)
    after = sample(CACHES[cache](apply(patcher, layout)), "flux", 1.0)
    assert _max(before, after) <= SAME
    assert _max(before, sample(apply(patcher, layout), "flux", 1.0)) > 1e-4, "the cache never acted"


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_guider_with_cache_shared_conditioning_equals_equal_content_conditionings(cache):
    """Members on one shared conditioning must not share a cache entry: the image equals the one from two
    conditionings of equal content (one per member), which ComfyUI gives different uuids."""
    patcher = CACHES[cache](_patcher("flux"))
    _, layout = model_layout(patcher)
    cond = tm.conditioning("flux", seed=11)
    equal_content = [[cond[0][0].clone(), dict(cond[0][1])]]
    shared = sample_guider(guider(patcher, two_members(layout, "positive")), "flux", cond, cond)
    separate = sample_guider(guider(patcher, two_members(layout, "negative")), "flux", cond, equal_content)
    assert _max(shared, separate) <= SAME
    plain = sample_guider(guider(_patcher("flux"), two_members(layout, "negative")), "flux", cond, equal_content)
    assert _max(separate, plain) > 1e-4, "the cache never acted"


@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("order", ["cache_first", "ensemble_first"])
def test_ensemble_with_cache_equals_guider_on_equal_content_conditionings(cache, order):
    """KSampler form, cfg 1: two positive members on the KSampler's one positive conditioning equal the guider's
    sample of the same members on two equal-content conditionings, both under the same cache."""
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    cond = tm.conditioning("flux", seed=11)
    equal_content = [[cond[0][0].clone(), dict(cond[0][1])]]
    if order == "cache_first":
        model = ensemble(CACHES[cache](patcher), two_members(layout))
    else:
        model = CACHES[cache](ensemble(patcher, two_members(layout)))
    ours = sample(model, "flux", 1.0, positive=cond)
    reference = sample_guider(guider(CACHES[cache](patcher), two_members(layout, "negative")), "flux", cond,
                              equal_content)
    assert _max(ours, reference) <= SAME


# ---------------------------------------------------------------- shift nodes: the window is read at sampling time

SHIFTS = {"flux": shift_flux, "sd3": shift_sd3, "auraflow": shift_auraflow}
WINDOW = ActiveRange(0.0, 0.5)


class _CountedRange(ActiveRange):
    """An ActiveRange that records, for each model call, whether the calibration acted (read by the test only)."""

    def __init__(self, start_percent: float, end_percent: float, calls: list):
        super().__init__(start_percent, end_percent)
        object.__setattr__(self, "calls", calls)

    def window(self, sigmas, model_sampling):
        inside = super().window(sigmas, model_sampling)
        self.calls.append(True if inside is None else bool(inside))
        return inside


def _counted(model, layout, window):
    """CalibriApply's mechanism with a window that counts the calls it acts on."""
    calls: list = []
    counted = _CountedRange(window.start_percent, window.end_percent, calls)
    return apply_calibration(model, one_member(layout), active_range=counted), calls


def _steps_inside(model, window):
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)[:-1]
    start, end = float(sampling.percent_to_sigma(window.start_percent)), float(
        sampling.percent_to_sigma(window.end_percent))
    return sum(1 for s in sigmas.tolist() if end <= s <= start)


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_apply_window_with_shift_node_is_order_independent(shift):
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    model_before, calls_before = _counted(SHIFTS[shift](patcher), layout, WINDOW)
    model_after, calls_after = _counted(patcher, layout, WINDOW)
    model_after = SHIFTS[shift](model_after)
    before, after = sample(model_before, "flux", 1.0), sample(model_after, "flux", 1.0)
    assert _max(before, after) <= SAME
    expected = _steps_inside(model_after, WINDOW)
    assert sum(calls_before) == sum(calls_after) == expected, (calls_before, calls_after, expected)
    assert 0 < expected < STEPS


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_ensemble_window_with_shift_node_is_order_independent(shift):
    patcher = _patcher("sd3")
    _, layout = model_layout(patcher)
    calibration = two_members(layout, "negative")
    before = sample(ensemble(SHIFTS[shift](patcher), calibration, WINDOW), "sd3", 4.5)
    after = sample(SHIFTS[shift](ensemble(patcher, calibration, WINDOW)), "sd3", 4.5)
    assert _max(before, after) <= SAME
    assert _max(after, sample(SHIFTS[shift](ensemble(patcher, calibration)), "sd3", 4.5)) > 1e-4


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_guider_window_follows_the_shifted_schedule(shift):
    """The guider takes a MODEL, so a shift node can only come before it: the window must use the shifted schedule,
    i.e. equal the same window applied member by member through CalibriApply's mechanism on the shifted model."""
    patcher = SHIFTS[shift](_patcher("flux"))
    _, layout = model_layout(patcher)
    calibration = one_member(layout)
    cond = tm.conditioning("flux", seed=11)
    ours = sample_guider(guider(patcher, calibration, WINDOW), "flux", cond, cond)
    reference = sample(apply_calibration(patcher, calibration, active_range=WINDOW), "flux", 1.0, positive=cond)
    assert _max(ours, reference) <= CLOSE


# ---------------------------------------------------------------- other guidance that shares ComfyUI's hooks

def _slg_reference(patcher, layout, calibration, cfg, skipped_block):
    """CalibriEnsemble + SkipLayerGuidanceDiTSimple by hand: cfg·Σω_i f_i(cond) + (1 − cfg)·f_skip(uncond), as one
    EnsembleGuider (a block whose gates are all 0 is ComfyUI's block skip: test_engine.py proves it)."""
    n = len(layout.gates)
    skip = tuple(0.0 if g.block == skipped_block else 1.0 for g in layout.gates)
    members = tuple(Member(m.scales, m.weight * cfg, m.prompt) for m in calibration.members)
    members += (Member(skip, 1.0 - cfg, "negative"),)
    return guider(patcher, Calibration(layout.family, "gate", layout.site_names("gate")[:n], members))


@pytest.mark.parametrize("order", ["slg_first", "ensemble_first"])
def test_ensemble_with_slg_simple_equals_hand_built_ensemble(order):
    """SkipLayerGuidanceDiTSimple takes ComfyUI's single cond-batch slot; CalibriEnsemble, a CALC_COND_BATCH
    wrapper, runs inside it in either order, so both act."""
    patcher = _patcher("sd3")
    _, layout = model_layout(patcher)
    calibration = Calibration(layout.family, "gate", layout.site_names("gate"),
                              (Member(_scales(len(layout.gates), 1), 1.3, "positive"),
                               Member(_scales(len(layout.gates), 2), -0.3, "positive")))
    model = (ensemble(slg_dit_simple(patcher), calibration) if order == "slg_first"
             else slg_dit_simple(ensemble(patcher, calibration)))
    ours = sample(model, "sd3", 4.5)
    reference = sample_guider(_slg_reference(patcher, layout, calibration, 4.5, "joint_blocks.1"), "sd3",
                              tm.conditioning("sd3", seed=11), tm.conditioning("sd3", seed=12))
    assert _max(ours, reference) <= CLOSE
    assert _max(ours, sample(ensemble(patcher, calibration), "sd3", 4.5)) > 1e-4, "SLG never acted"


OTHERS = {"slg_dit": ("flux", slg_dit), "slg_dit_simple": ("sd3", slg_dit_simple), "slg_sd3": ("sd3", slg_sd3),
          "lora": ("flux", lora), "rescale_cfg": ("sd3", rescale_cfg), "post_cfg": ("sd3", post_cfg)}


@pytest.mark.parametrize("other", sorted(OTHERS))
def test_apply_with_other_node_is_order_independent(other):
    family, node = OTHERS[other]
    patcher = _patcher(family)
    _, layout = model_layout(patcher)
    cfg = FAMILY_OF[family]
    before = sample(apply(node(patcher), layout), family, cfg)
    after = sample(node(apply(patcher, layout)), family, cfg)
    assert _max(before, after) <= SAME
    assert _max(after, sample(apply(patcher, layout), family, cfg)) > 1e-4, f"{other} never acted"
    assert _max(after, sample(node(patcher), family, cfg)) > 1e-4, "the calibration never acted"


@pytest.mark.parametrize("other", sorted(set(OTHERS) - {"slg_dit_simple"}))
def test_ensemble_with_other_node_is_order_independent(other):
    family, node = OTHERS[other]
    patcher = _patcher(family)
    _, layout = model_layout(patcher)
    calibration = two_members(layout, "negative" if family == "sd3" else "positive")
    cfg = FAMILY_OF[family]
    before = sample(ensemble(node(patcher), calibration), family, cfg)
    after = sample(node(ensemble(patcher, calibration)), family, cfg)
    assert _max(before, after) <= SAME
    assert _max(after, sample(ensemble(patcher, calibration), family, cfg)) > 1e-4, f"{other} never acted"


@pytest.mark.parametrize("other", ["slg_dit", "slg_dit_simple", "slg_sd3", "rescale_cfg", "post_cfg"])
def test_guider_with_cfg_hooks_is_refused(other):
    """The guider samples Σ ω_i f_i itself and has no cond/uncond pair for CFG hooks to act on: refused by name."""
    family, node = OTHERS[other]
    patcher = node(_patcher(family))
    _, layout = model_layout(patcher)
    with pytest.raises(ValueError, match="CalibriEnsembleGuider cannot honour"):
        guider(patcher, two_members(layout, "negative"))


def test_guider_on_a_calibri_ensemble_model_is_refused():
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    with pytest.raises(ValueError, match="CalibriEnsemble"):
        guider(ensemble(patcher, two_members(layout)), two_members(layout))


def test_guider_with_lora_equals_cfg_guider_on_identity_calibration():
    import comfy.samplers

    patcher = lora(_patcher("flux"))
    _, layout = model_layout(patcher)
    cond = tm.conditioning("flux", seed=11)
    identity = Calibration.identity(layout, "gate")
    ours = sample_guider(guider(patcher, identity), "flux", cond, cond)
    plain = comfy.samplers.CFGGuider(patcher)
    plain.set_cfg(1.0)
    assert _max(ours, sample_guider(plain, "flux", cond, cond)) <= SAME
    assert _max(ours, sample_guider(guider(_patcher("flux"), identity), "flux", cond, cond)) > 1e-4


# ---------------------------------------------------------------- torch.compile (TorchDynamo, eager backend)

@pytest.mark.parametrize("row", ["apply", "ensemble"])
@pytest.mark.parametrize("order", ["compile_first", "calibri_first"])
def test_torch_compile_equals_uncompiled(row, order):
    """Compiled and uncompiled give the same image, also when the compiled model ran uncalibrated first (a stale
    compiled graph would silently drop the calibration)."""
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    ours_fn = (lambda m: apply(m, layout)) if row == "apply" else (lambda m: ensemble(m, two_members(layout)))
    expected = sample(ours_fn(patcher), "flux", 1.0)
    compiled = torch_compile(patcher)
    sample(compiled, "flux", 1.0)  # warm the compiled graph on the uncalibrated model
    model = ours_fn(compiled) if order == "compile_first" else torch_compile(ours_fn(patcher))
    assert _max(sample(model, "flux", 1.0), expected) <= CLOSE


def test_guider_with_torch_compile_equals_uncompiled():
    patcher = _patcher("flux")
    _, layout = model_layout(patcher)
    cond = tm.conditioning("flux", seed=11)
    expected = sample_guider(guider(patcher, two_members(layout)), "flux", cond, cond)
    ours = sample_guider(guider(torch_compile(patcher), two_members(layout)), "flux", cond, cond)
    assert _max(ours, expected) <= CLOSE
