"""The search loop on a fast fake evaluator (a seeded quadratic): convergence, reproducibility, NaN handling.

``QuadraticEvaluator`` is also the ``python:test_search_loop:QuadraticEvaluator`` hook used by the resume and
distributed tests (they run the CLI in subprocesses with tests/ on PYTHONPATH).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import zlib

import numpy as np
import pytest
import torch

from calibri_core.families import get_family
from calibri_core.preset import load_preset

TINY_COUNTS = {"double_blocks": 2, "single_blocks": 2}


class QuadraticEvaluator:
    """Reward = −|x − target|² + a per-(prompt, seed) offset shared by all candidates (common random numbers).

    Options (``model.options``): ``counts``; ``sleep`` seconds per candidate; ``nan_above``: reward NaN when any
    scale exceeds it; ``rng_noise``: add a tiny term drawn from the *global* python/numpy/torch RNGs, so a resumed
    run only matches when those states were restored.
    """

    def __init__(self, config):
        opts = config.model["options"]
        self.family = config.model["family"]
        self.layout = get_family(self.family).layout(opts.get("counts", TINY_COUNTS))
        self.granularity = config.search["granularity"]
        k = len(self.layout.site_names(self.granularity))
        n = len(config.members)
        self.target = np.array([1.0 + 0.4 * math.sin(1.7 * i + 0.3) for i in range(n * k)] + [1.3] * n)
        self.sleep = float(opts.get("sleep", 0.0))
        self.nan_above = opts.get("nan_above")
        self.rng_noise = bool(opts.get("rng_noise", False))
        self.model_info = {"hash": "sha256:fake", "evaluator": "QuadraticEvaluator"}
        self.calls = 0

    @staticmethod
    def vector(calibration) -> np.ndarray:
        return np.array([s for m in calibration.members for s in m.scales] + [m.weight for m in calibration.members])

    def evaluate(self, candidates, prompts, seed):
        out = []
        for c in candidates:
            self.calls += 1
            x = self.vector(c)
            offsets = [np.random.default_rng([seed, zlib.crc32(p.encode())]).normal() for p in prompts]
            value = -float(((x - self.target) ** 2).sum()) + 0.01 * float(np.mean(offsets))
            if self.rng_noise:
                value += 1e-6 * (random.random() + float(np.random.rand()) + float(torch.rand(1)))
            if self.nan_above is not None and max(s for m in c.members for s in m.scales) > self.nan_above:
                value = float("nan")
            out.append(value)
            if self.sleep:
                time.sleep(self.sleep)
        shard_log = os.environ.get("CALIBRI_TEST_SHARD_LOG")  # set by the distributed test
        if shard_log:
            with open(f"{shard_log}.{os.environ.get('RANK', '0')}", "w") as f:
                f.write(str(self.calls))
        return torch.tensor(out, dtype=torch.float64)

    def images(self, calibration, prompts, seed):
        level = float(np.clip(np.mean(self.vector(calibration)) / 2, 0, 1))
        return torch.full((len(prompts), 8, 8, 3), level)


def write_prompts(path, count: int, prefix: str) -> str:
    path.write_text("".join(f"{prefix} prompt {i}\n" for i in range(count)), encoding="utf-8")
    return str(path)


def raw_config(tmp_path, run_dir: str = "run", **search) -> dict:
    """A small run config (as a dict) on the fake evaluator; paths absolute under ``tmp_path``."""
    return {
        "model": {"family": "flux", "name": "tiny-flux", "options": {}},
        "search": {"granularity": "block", "seed": 3, "generations": 12, "val_every": 4, "bucket_size": 4,
                   "evaluator": "python:test_search_loop:QuadraticEvaluator", **search},
        "prompts": {"train": write_prompts(tmp_path / "train.txt", 10, "train"),
                    "validation": write_prompts(tmp_path / "val.txt", 3, "val")},
        "output": {"run_dir": str(tmp_path / run_dir), "grid_prompts": 2},
        "rewards": [{"name": "target", "weight": 1.0}],
    }


def to_toml(data: dict) -> str:
    """Enough TOML for these configs (tables, arrays of tables, scalars, lists, inline dicts)."""
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    lines = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def test_converges_on_quadratic(tmp_path):
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=60, val_every=10)
    result = run_search(cfg)
    hist = result.history
    assert len(hist) == 60
    assert hist[-1]["train_best"] > -1e-2, hist[-1]
    assert hist[0]["train_best"] < -0.2
    assert result.best_val > result.baseline_val
    target = QuadraticEvaluator.__new__(QuadraticEvaluator)
    best = QuadraticEvaluator.vector(load_preset(result.best_preset).calibration)
    ev_target = np.array([1.0 + 0.4 * math.sin(1.7 * i + 0.3) for i in range(4)] + [1.3])
    assert np.abs(best - ev_target).max() < 0.1, (best, target)
    prov = load_preset(result.best_preset).provenance
    # calibri-best is the reference's solution, the best training candidate; the best by validation is written too
    assert prov["selection"].startswith("best training fitness") and prov["statistics"]["final"] == "best-train"
    run = tmp_path / "run"
    assert (run / "calibri-best.safetensors").read_bytes() != (run / "calibri-best-validation.safetensors").read_bytes()
    assert load_preset(str(run / "calibri-best-train.safetensors")).calibration == load_preset(
        result.best_preset).calibration
    val = load_preset(str(run / "calibri-best-validation.safetensors")).provenance
    assert val["selection"].startswith("best validation score") and val["statistics"]["val_score"] == result.best_val
    assert json.loads((run / "summary.json").read_text())["calibri_best"] == "best-train"
    assert prov["model"]["hash"] == "sha256:fake" and prov["steps"] == 15 and prov["guidance"] == 3.5
    mean = load_preset(result.mean_preset)
    assert "mean" in mean.provenance["selection"]
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["generation"] for x in lines] == list(range(1, 61))
    for name in ("plot_train.png", "plot_validation.png", "plot_sigma.png", "plot_scales.png", "grid_validation.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 100, name


def test_first_candidate_is_identity_and_buckets_reproducible(tmp_path):
    from search.loop import run_search

    seen = []

    class Recording(QuadraticEvaluator):
        def evaluate(self, candidates, prompts, seed):
            seen.append(([self.vector(c).tolist() for c in candidates], list(prompts), seed))
            return super().evaluate(candidates, prompts, seed)

    from search.config import load_config

    config = load_config(None, raw=raw_config(tmp_path, generations=3, val_every=100))
    run_search(config, evaluator=Recording(config))
    assert seen[0][0][0] == [1.0, 1.0, 1.0, 1.0, 1.0] and seen[0][2] == 3 + 1 - 1  # generation g: seed + g - 1
    train = [s for s in seen if s[2] != 1234]
    # one candidate per call; every candidate of a generation sees the same bucket and seed
    gens = {}
    for cands, prompts, seed in train:
        gens.setdefault(seed, set()).add(tuple(prompts))
    assert sorted(gens) == [3, 4, 5] and all(len(v) == 1 for v in gens.values())
    buckets = [next(iter(gens[s])) for s in sorted(gens)]
    assert all(len(b) == 4 for b in buckets)
    assert len(set(buckets[0]) | set(buckets[1])) == 8  # a permutation, not draws with replacement


def test_same_seed_same_trajectory_and_global_rng_untouched(tmp_path):
    from search.loop import run_search

    a = run_search(raw_config(tmp_path, "a", generations=8))
    b = run_search(raw_config(tmp_path, "b", generations=8))
    c = run_search(raw_config(tmp_path, "c", generations=8, seed=4))
    strip = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in b.history]
    assert strip != [{k: v for k, v in r.items() if not k.endswith("_s")} for r in c.history]
    assert open(a.best_preset, "rb").read() == open(b.best_preset, "rb").read()
    assert open(a.mean_preset, "rb").read() == open(b.mean_preset, "rb").read()


def test_optimizer_leaves_numpy_global_rng_alone():
    from search.optimizer import CMAOptimizer

    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    opt = CMAOptimizer(np.ones(5), 0.25, [-1] * 5, [2] * 5, None, 1)
    for _ in range(3):
        xs = opt.ask()
        opt.tell([float((x ** 2).sum()) for x in xs])
    assert (np.random.get_state()[1] == before).all(), "pycma must not move NumPy's global RNG"
    other = CMAOptimizer(np.ones(5), 0.25, [-1] * 5, [2] * 5, None, 1)
    np.random.rand(7)  # the caller using the global RNG must not change the optimiser's samples
    first = CMAOptimizer(np.ones(5), 0.25, [-1] * 5, [2] * 5, None, 1).ask()
    assert all((a == b).all() for a, b in zip(other.ask(), first))


def test_nan_fitness_is_worst_and_logged(tmp_path, caplog):
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=10)
    cfg["model"]["options"] = {"nan_above": 1.2}
    with caplog.at_level("WARNING", logger="calibri"):
        result = run_search(cfg)
    nan_total = sum(r["nan_count"] for r in result.history)
    assert nan_total > 0
    assert "non-finite reward" in caplog.text
    assert all(r["train_best"] is None or math.isfinite(r["train_best"]) for r in result.history)
    best = load_preset(result.best_preset).calibration
    assert max(best.members[0].scales) <= 1.2
    assert load_preset(result.best_preset).provenance["statistics"]["nan_rewards"] == nan_total


def test_reward_to_loss_negates_once():
    from search.optimizer import reward_to_loss

    losses, bad = reward_to_loss([2.0, float("nan"), -1.0, float("inf")])
    assert bad == 2
    assert losses[0] == -2.0 and losses[2] == 1.0
    assert losses[1] == losses[3] > 1.0
    assert reward_to_loss([float("nan")] * 3)[0].tolist() == [0.0, 0.0, 0.0]


def test_cfg_members_vector_order(tmp_path):
    from search.config import load_config
    from search.loop import SearchSpace

    cfg = raw_config(tmp_path)
    cfg["model"]["family"] = "sd3"
    cfg["model"]["options"] = {"counts": {"joint_blocks": 2, "dual_attention_blocks": [0],
                                          "context_pre_only_blocks": [1], "scale_mod_only": False}}
    config = load_config(None, raw=cfg)
    assert [m["weight"] for m in config.members] == [7.0, -6.0]
    ev = QuadraticEvaluator(config)
    space = SearchSpace(ev.layout, "gate", config.members, [-1, 2], [-10, 10])
    sites = ev.layout.site_names("gate")
    assert space.order()[:len(sites)] == [(0, s) for s in sites]
    assert space.order()[-2:] == [(0, "ω"), (1, "ω")]
    assert space.x0[-2:].tolist() == [7.0, -6.0] and space.dimension == 2 * len(sites) + 2
    cal = space.to_calibration(space.x0)
    assert [m.prompt for m in cal.members] == ["positive", "negative"]


@pytest.mark.parametrize("popsize", [0, 6])
def test_popsize_default_and_override(tmp_path, popsize):
    from search.loop import run_search

    result = run_search(raw_config(tmp_path, generations=1, popsize=popsize))
    assert result.history[0]["popsize"] == (popsize or 4 + int(3 * math.log(5)))


def test_final_best_validation_option(tmp_path):
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=8)
    cfg["output"]["final"] = "best-validation"
    result = run_search(cfg)
    run = tmp_path / "run"
    assert (run / "calibri-best.safetensors").read_bytes() != (run / "calibri-best-train.safetensors").read_bytes()
    prov = load_preset(result.best_preset).provenance
    assert prov["selection"].startswith("best validation score") and prov["statistics"]["final"] == "best-validation"
    assert load_preset(str(run / "calibri-best-validation.safetensors")).calibration == result.best
    assert json.loads((run / "summary.json").read_text())["calibri_best"] == "best-validation"


class FlatEvaluator(QuadraticEvaluator):
    """Every candidate scores the same: pycma's own stop criteria (flat fitness) end the run."""

    def evaluate(self, candidates, prompts, seed):
        return torch.zeros(len(candidates))


def test_no_generation_cap_runs_until_pycma_stops(tmp_path):
    from search.config import load_config
    from search.loop import run_search

    cfg = raw_config(tmp_path, evaluator="python:test_search_loop:FlatEvaluator")
    del cfg["search"]["generations"]
    config = load_config(None, raw=cfg)
    assert config.search["generations"] is None
    result = run_search(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 1 <= result.generations < 50 and summary["pycma_stop"], summary
    assert summary["generations"] == result.generations
    # A cap stops earlier than pycma would.
    flat = "python:test_search_loop:FlatEvaluator"
    capped = run_search(raw_config(tmp_path, "capped", generations=1, evaluator=flat))
    assert capped.generations == 1
