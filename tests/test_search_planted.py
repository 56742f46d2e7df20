"""Planted calibration (issue 4): the search (``search.loop.run_search`` with the packed ComfyUI evaluator) recovers a
hidden calibration of a tiny FLUX, and of tiny models of newer families (issue 11: nothing in the search or the
nodes is family-specific).

Target images are sampled with a hidden block-granularity calibration (two of the four block scales moved) at one
fixed seed; the ``target`` reward (negative MSE to the target image of each prompt) is 0 exactly at the hidden
calibration. The run uses the reference's optimiser settings (x0 = identity injected, sigma0 0.25, bounds [-1, 2] /
[-10, 10]) with ``fixed_noise`` so that every generation samples with the targets' noise.
"""

import time

import pytest
from tiny_models import SPECS, build_patcher

from calibri_core.calibration import Calibration, Member
from calibri_core.preset import load_preset
from search.evaluator import Evaluator
from search.loop import run_search
from search.models import HashTextEncoder, ModelBundle
from search.rewards import build_rewards

HIDDEN = (1.4, 1.0, 0.6, 1.0)  # block scales: FLUX double_blocks.0, .1, single_blocks.0, .1 (AuraFlow: *_layers;
#                                Krea 2: blocks.0-3)
FAMILIES = ("flux", "auraflow", "krea2")  # AuraFlow (issue 11, part 1) on both hosts; Krea 2 (part 2) on 0.33
FOUR_BLOCKS = {"krea2": {"layers": 4}}  # model kwargs that give a family's tiny spec 4 blocks
PROMPTS = ["a red cube", "a green tree by a lake", "two birds"]
SEED = 5
GENERATIONS = 60
POPSIZE = 12
TOLERANCE = 0.05  # |found − hidden| per scale and for ω


def _evaluator(family, reward=None):
    spec = SPECS[family]
    bundle = ModelBundle(build_patcher(family, **FOUR_BLOCKS.get(family, {})),
                         HashTextEncoder(spec.context[0], spec.context[1], spec.pooled),
                         name=f"tiny-{family}")
    return Evaluator(bundle, reward, steps=4, latent_shape=spec.latent)


def planted_evaluator(config=None, family="flux") -> Evaluator:
    """The run's evaluator (the config's ``search.evaluator`` hook, for the config's family): the target reward holds
    the images the hidden calibration makes for each prompt at the fixed seed."""
    family = config.model["family"] if config is not None else family
    probe = _evaluator(family)
    ident = probe.identity()
    hidden = Calibration(ident.family, "block", ident.sites, (Member(HIDDEN, 1.0),))
    target = probe.images(hidden, PROMPTS, SEED)
    return _evaluator(family, build_rewards([{"name": "target", "images": target, "prompts": PROMPTS}]))


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_calibration_is_recovered(tmp_path, family):
    evaluator = planted_evaluator(family=family)
    ident = evaluator.identity()
    baseline = float(evaluator.evaluate([ident], PROMPTS, SEED)[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    config = {
        "model": {"family": family, "name": f"tiny-{family}", "options": {}},
        "search": {"evaluator": "python:test_search_planted:planted_evaluator", "granularity": "block",
                   "seed": SEED, "fixed_noise": True, "generations": GENERATIONS,
                   "popsize": POPSIZE, "val_every": 20, "val_seed": SEED, "bucket_size": len(PROMPTS)},
        "prompts": {"train": str(prompts), "validation": str(prompts)},
        "output": {"run_dir": str(tmp_path / "run"), "grid_prompts": 1},
        "rewards": [{"name": "target", "weight": 1.0}],
    }
    start = time.perf_counter()
    result = run_search(config)
    elapsed = time.perf_counter() - start

    found = load_preset(result.best_preset).calibration
    best = float(evaluator.evaluate([found], PROMPTS, SEED)[0])
    gap_closed = (best - baseline) / (0.0 - baseline)
    scales, weight = found.members[0].scales, found.members[0].weight
    print(f"planted {family}: gap closed {gap_closed:.3f}, scales {[round(s, 3) for s in scales]}, ω {weight:.3f}, "
          f"{GENERATIONS} generations x {POPSIZE} candidates in {elapsed:.1f} s")
    assert baseline < 0
    assert gap_closed >= 0.9
    assert max(abs(s - h) for s, h in zip(scales, HIDDEN)) <= TOLERANCE, scales
    assert abs(weight - 1.0) <= TOLERANCE  # the time is printed, not asserted: benchmarks are not timed tests
