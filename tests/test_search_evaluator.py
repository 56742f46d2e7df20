"""Search evaluator (issue 4): packing equivalence, common random numbers, identity, NaN candidates, prompt cache."""

import pytest
import torch
from tiny_models import SPECS, build_patcher

from calibri_core.calibration import Calibration, Member
from search.evaluator import CPU_ROWS, Evaluator, parse_bytes
from search.models import HashTextEncoder, LatentRGBDecoder, ModelBundle, load_bundle
from search.prompts import default_prompts, read_prompts
from search.rewards import build_rewards

PROMPTS = ["a red cube on a blue sphere", "two cats", "a lighthouse at night"]


def make(family="flux", tmp_path=None, encoder=None, **kwargs):
    spec = SPECS[family]
    encoder = encoder or HashTextEncoder(spec.context[0], spec.context[1], spec.pooled)
    bundle = ModelBundle(build_patcher(family), encoder)
    reward = build_rewards([{"name": "target", "images": torch.full((1, 8, 8, 3), 0.5)}])
    kwargs.setdefault("steps", 3)
    kwargs.setdefault("latent_shape", spec.latent)
    return Evaluator(bundle, reward, cache_dir=tmp_path, **kwargs)


def candidate(ev, scales, weight=1.0):
    ident = ev.identity()
    return Calibration(ident.family, ident.granularity, ident.sites, (Member(tuple(scales), weight),))


@pytest.fixture(scope="module")
def flux():
    return make("flux")


def test_packed_equals_one_at_a_time(flux):
    cands = [flux.identity(), candidate(flux, (1.3, 0.7, 1.0, 1.2), 0.9), candidate(flux, (0.5, 1.5, 1.1, 0.9))]
    flux.batch_size = len(cands) * len(PROMPTS)
    packed = flux.images_many(cands, PROMPTS, seed=7)
    fit_packed = flux.evaluate(cands, PROMPTS, seed=7)
    assert flux.stats["forward_rows"] == len(cands) * len(PROMPTS)  # one pack: every pair in one forward
    flux.batch_size = "auto"
    assert flux.max_rows() == CPU_ROWS  # on CPU the automatic size is capped
    flux.batch_size = 1
    try:
        alone = [flux.images(c, PROMPTS, seed=7) for c in cands]
        fit_alone = torch.cat([flux.evaluate([c], PROMPTS, seed=7) for c in cands])
    finally:
        flux.batch_size = "auto"
    for a, b in zip(packed, alone):
        assert (a - b).abs().max() <= 1e-5
    assert (fit_packed - fit_alone).abs().max() <= 1e-5
    assert not torch.equal(packed[0], packed[1])  # the candidates really differ


def test_common_random_numbers(flux):
    c = candidate(flux, (1.2, 0.9, 1.0, 1.1), 1.05)
    # One candidate per pack: CPU kernels are not batch-invariant either (a pass alone in a pack of 1 differs from
    # the same pass in a pack of 8 in the last bits), so bit-equality needs packs composed alike.
    flux.batch_size = len(PROMPTS)
    try:
        fitness = flux.evaluate([c, flux.identity(), c], PROMPTS, seed=3)
    finally:
        flux.batch_size = "auto"
    assert fitness[0] == fitness[2]
    assert fitness[0] != fitness[1]
    assert flux.last_scores.shape == (3, len(PROMPTS))
    # another seed, other noise
    assert flux.evaluate([c], PROMPTS, seed=4)[0] != fitness[0]


def _conditioning(ev, prompts):
    ev.prepare(prompts)
    conds = [ev._encodings[p] for p in prompts]
    options = {k: None if v is None else torch.cat([c[1][k] for c in conds]) for k, v in conds[0][1].items()}
    if ev.guidance is not None:
        options["guidance"] = ev.guidance
    return [[torch.cat([c[0] for c in conds]), options]]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_identity_reproduces_unpatched_sampler(family):
    import comfy.sample

    ev = make(family)
    prompts = PROMPTS[:2]
    noise = ev.noise_for(prompts, 11)
    positive = _conditioning(ev, prompts)
    negative = _conditioning(ev, [ev.negative_prompt] * len(prompts))
    latents = comfy.sample.sample(ev.model, noise, ev.steps, ev.cfg, "euler", "simple", positive, negative,
                                  torch.zeros_like(noise), seed=11, disable_pbar=True)
    expected = LatentRGBDecoder(ev.model.get_model_object("latent_format")).decode(latents)
    got = ev.images(ev.identity(), prompts, seed=11)
    assert (got - expected).abs().max() <= 1e-5
    if family == "sd3":
        assert ev.cfg == 7.0 and ev.identity().weights == (7.0, -6.0)


def test_sd3_ensemble_packed_equals_alone():
    ev = make("sd3")
    ident = ev.identity()
    n = len(ident.sites)
    other = Calibration(ident.family, ident.granularity, ident.sites,
                        (Member((1.2,) * n, 5.0, "positive"), Member((0.8,) * n, -4.0, "negative")))
    packed = ev.images_many([ident, other], PROMPTS[:2], seed=1)
    ev.batch_size = 2
    alone = [ev.images(c, PROMPTS[:2], seed=1) for c in (ident, other)]
    for a, b in zip(packed, alone):
        assert (a - b).abs().max() <= 1e-5


def test_non_finite_images_give_nan_fitness(flux):
    """A candidate that blew up (e.g. a half-precision VAE overflowing) scores NaN; the reward never sees NaN.
    Scales are bounded to the engine's finite range, so a tiny fp32 model cannot be made to overflow: the images
    are made non-finite here instead."""
    images = flux.images(flux.identity(), PROMPTS[:2], seed=0)
    images[1, 0, 0, 0] = float("nan")
    seen = []

    class SpyReward:
        def score(self, batch, prompts):
            seen.append(batch)
            return batch.mean((1, 2, 3))

    rewards, flux.rewards = flux.rewards, SpyReward()
    try:
        scores = flux._score(images, PROMPTS[:2])
    finally:
        flux.rewards = rewards
    assert torch.isfinite(scores[0]) and torch.isnan(scores[1])
    assert torch.isfinite(seen[0]).all()


def test_prompt_cache_hit(tmp_path):
    first = make("flux", tmp_path)
    first.prepare(PROMPTS)
    assert first.encoder_calls == len(PROMPTS) + 1  # + the negative prompt ""
    spec = SPECS["flux"]
    counting = HashTextEncoder(spec.context[0], spec.context[1], spec.pooled)
    second = make("flux", tmp_path, encoder=counting)
    second.prepare(PROMPTS)
    assert second.encoder_calls == 0 and counting.calls == 0
    for p in PROMPTS:
        assert torch.equal(first._encodings[p][0], second._encodings[p][0])
    second.prepare(PROMPTS + ["a new prompt"])
    assert counting.calls == 1


def test_auto_batch_honours_max_memory(flux):
    import psutil

    per_row = flux._estimate_per_row()
    rss = psutil.Process().memory_info().rss
    flux.max_memory, flux._per_row = int(rss + 3 * per_row), None
    try:
        assert 1 <= flux.max_rows() <= 3
    finally:
        flux.max_memory = None
    flux._per_row = None
    assert flux.max_rows() > 3
    assert parse_bytes("2GiB") == 2 * 1024 ** 3 and parse_bytes("auto") is None
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_missing_model_file(tmp_path):
    missing = tmp_path / "flux1-dev.safetensors"
    with pytest.raises(FileNotFoundError, match="flux1-dev.safetensors"):
        load_bundle(model=missing, text_encoders=[], vae=None)
    with pytest.raises(FileNotFoundError, match="clip_l.safetensors"):
        load_bundle(model=missing, text_encoders=[tmp_path / "clip_l.safetensors"])


def test_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# comment\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(empty)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")
    train, val = default_prompts("train"), default_prompts("val")
    assert len(train) >= 100 and len(val) == 30
    assert len(set(train)) == len(train) and not set(train) & set(val)


def test_noise_follows_the_prompt_not_its_position():
    ev = make("flux")
    forward, backward = ev.noise_for(PROMPTS[:3], 7), ev.noise_for(PROMPTS[:3][::-1], 7)
    assert torch.equal(forward, backward.flip(0))
    assert not torch.equal(forward[0], forward[1]) and not torch.equal(forward, ev.noise_for(PROMPTS[:3], 8))


# --- one combination behind both front doors: EnsembleGuider (nodes) and the evaluator's packed guider (search) ----

SIGMA = 0.7


def _one_step(guider, x):
    """The x0 one sampler call gets from ``guider`` at σ = SIGMA (its conds already set)."""
    import comfy.samplers

    seen = {}

    def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(noise, sigmas[0] * noise.new_ones([noise.shape[0]]), **(extra_args or {}))
        return seen["x0"]

    with torch.no_grad():
        guider.sample(x.clone(), torch.zeros_like(x), comfy.samplers.KSAMPLER(one_call), torch.tensor([SIGMA, 0.0]),
                      seed=0)
    return seen["x0"]


def _ensembles(ev):
    ident = ev.identity()
    n = len(ident.sites)
    g = torch.Generator().manual_seed(3)

    def scales():
        return tuple((0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)).tolist())

    def calibration(*members):
        return Calibration(ident.family, ident.granularity, ident.sites, members)

    return [calibration(Member(scales(), 4.0, "positive"), Member(scales(), -3.0, "negative")),
            calibration(Member(scales(), 2.5, "positive"), Member(scales(), -1.5, "negative")),
            calibration(Member(scales(), 1.0, "positive"))]  # a lone pass of ω 1: its x0 is taken as is


@pytest.fixture(scope="module")
def qwen():
    return make("qwen_image")


@pytest.mark.parametrize("rescale", [False, True])
def test_packed_evaluator_and_ensemble_guider_give_the_same_x0(qwen, rescale):
    from calibri_core.sampling import EnsembleGuider
    from search.evaluator import _PackGuider

    candidates, prompts = _ensembles(qwen), PROMPTS[:2]
    default, qwen.rescale = qwen.rescale, rescale
    try:
        plans = [qwen._terms(c) for c in candidates]
    finally:
        qwen.rescale = default
    qwen.prepare(prompts)
    noise = qwen.noise_for(prompts, 5)
    pack = [(k, p) for k in range(len(candidates)) for p in range(len(prompts))]
    groups = qwen._groups(pack, plans, prompts)
    assert len(groups) == 1 and len(groups[0].pairs) > len(pack), "one forward, several passes adding into a pair"
    packed = _one_step(_PackGuider.make(qwen.patched, groups, qwen.patch_size if rescale else None),
                       noise[torch.tensor([p for _, p in pack])])
    negative = _conditioning(qwen, [qwen.negative_prompt])
    for j, (k, p) in enumerate(pack):
        guider = EnsembleGuider(qwen.model, candidates[k], rescale=rescale)
        guider.set_conds(_conditioning(qwen, [prompts[p]]), negative)
        alone = _one_step(guider, noise[p:p + 1])
        assert (packed[j:j + 1] - alone).abs().max() <= 1e-5, f"candidate {k}, prompt {p}, rescale={rescale}"
    if rescale:  # the rescale really acts, so the comparison above covers it
        plain = _one_step(_PackGuider.make(qwen.patched, groups, None), noise[torch.tensor([p for _, p in pack])])
        assert (plain[:2] - packed[:2]).abs().max() > 1e-3


def test_evaluator_combines_with_calibri_core_ensemble(qwen, monkeypatch):
    import calibri_core.ensemble as ensemble
    import calibri_core.sampling as sampling
    import search.evaluator as evaluator

    for name in ("combine_x0", "rescale_x0"):
        assert getattr(evaluator, name) is getattr(ensemble, name) is getattr(sampling, name)
    calls = []

    def spy(name):
        original = getattr(ensemble, name)

        def call(*args, **kwargs):
            calls.append((name, args[0].shape[0]))
            return original(*args, **kwargs)

        return call

    for name in ("combine_x0", "rescale_x0"):
        monkeypatch.setattr(evaluator, name, spy(name))
    qwen.images_many(_ensembles(qwen)[:2], PROMPTS[:2], seed=0)
    pairs = 2 * len(PROMPTS[:2])
    assert calls.count(("combine_x0", pairs)) == qwen.steps and calls.count(("rescale_x0", pairs)) == qwen.steps
