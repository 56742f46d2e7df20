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
    return Evaluator(bundle, reward, latent_shape=spec.latent, cache_dir=tmp_path, **kwargs)


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
    fitness = flux.evaluate([c, flux.identity(), c], PROMPTS, seed=3)
    assert fitness[0] == fitness[2]
    assert fitness[0] != fitness[1]
    assert flux.last_scores.shape == (3, len(PROMPTS))
    # another seed, other noise
    assert flux.evaluate([c], PROMPTS, seed=4)[0] != fitness[0]


def _conditioning(ev, prompts):
    ev.prepare(prompts)
    conds = [ev._encodings[p] for p in prompts]
    options = {k: torch.cat([c[1][k] for c in conds]) for k in conds[0][1]}
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


def test_nan_candidate_gives_nan_fitness(flux):
    bad = candidate(flux, (1e30, 1e30, 1e30, 1e30), 1e30)
    fitness = flux.evaluate([flux.identity(), bad], PROMPTS[:2], seed=0)
    assert torch.isfinite(fitness[0])
    assert torch.isnan(fitness[1])


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
