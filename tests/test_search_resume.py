"""A search killed with SIGKILL at random points and resumed each time ends with the same preset bytes as an
uninterrupted run. Runs the real CLI (``python -m search``) in subprocesses on the fake quadratic evaluator."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_search_loop import raw_config, to_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search", "--no-progress", "--log-level", "WARNING", *args]


def _config(tmp_path, name: str) -> str:
    cfg = raw_config(tmp_path, name, generations=20, val_every=3, popsize=6)
    # Per-candidate sleep spreads the run over a few seconds so kills land mid-generation, mid-save, ...;
    # rng_noise makes the fitness depend on the global RNG states, so they must be checkpointed too.
    cfg["model"]["options"] = {"sleep": 0.05, "rng_noise": True}
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return str(path)


def _outputs(run_dir) -> dict:
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in ("calibri-best.safetensors", "calibri-last-mean.safetensors")}


def _generation(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "state.json"), encoding="utf-8") as f:
            return json.load(f)["generation"]
    except (OSError, ValueError):
        return -1  # no state yet (or, never with atomic writes, a torn file)


@pytest.mark.slow
def test_sigkill_resume_bit_identical(tmp_path):
    from search.loop import run_search

    reference = run_search(_config(tmp_path, "ref"))  # in-process: same code, saves one interpreter start
    reference = _outputs(os.path.dirname(reference.best_preset))

    cfg = _config(tmp_path, "killed")
    run_dir = str(tmp_path / "killed")
    rnd = random.Random(20260324)
    # Kill points: once while starting up / before generation 1, then just after random generations.
    targets = [0] + sorted(rnd.sample(range(2, 19), 3))
    killed_at = []
    for target in targets:
        started = os.path.isfile(os.path.join(run_dir, "config.json"))
        args = ("--resume", run_dir) if started else ("--config", cfg)
        proc = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (target == 0 and os.path.isfile(os.path.join(run_dir, "config.json"))) or \
                    (target > 0 and _generation(run_dir) >= target):
                break
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.3))  # anywhere inside a generation, its evaluation or its save
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_generation(run_dir))
    assert killed_at[-1] < 20, killed_at
    final = subprocess.run(_cli("--resume", run_dir), cwd=REPO, env=_env(), capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()
    assert _outputs(run_dir) == reference, f"killed after generations {killed_at}"
    log = [json.loads(x) for x in open(os.path.join(run_dir, "generations.jsonl"))]
    assert [r["generation"] for r in log] == list(range(1, 21))
    ref_log = [json.loads(x) for x in open(tmp_path / "ref" / "generations.jsonl")]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(log) == strip(ref_log)


def test_in_process_resume_matches(tmp_path):
    """Stopping after k generations and resuming (same process) gives the same presets as one run."""
    from search.config import load_config
    from search.loop import run_search

    ref = run_search(raw_config(tmp_path, "ref", generations=9, val_every=4))
    cfg = raw_config(tmp_path, "part", generations=9, val_every=4)
    run_search(cfg, max_generations=5)
    run_search(load_config(None, raw=cfg), resume=True, max_generations=2)
    result = run_search(load_config(None, raw=cfg), resume=True)
    assert result.generations == 9
    assert _outputs(tmp_path / "part") == _outputs(os.path.dirname(ref.best_preset))


def test_edited_optimizer_log_is_refused(tmp_path):
    """The optimiser is replayed from optimizer.jsonl (no pickle); a candidate changed by one ulp is found."""
    import numpy as np

    from search.config import load_config
    from search.loop import run_search
    from search.state import RunStateError

    cfg = raw_config(tmp_path, generations=4)
    run_search(cfg, max_generations=2)
    log = tmp_path / "run" / "optimizer.jsonl"
    lines = log.read_text().splitlines()
    record = json.loads(lines[0])
    record["candidates"][3][1] = float(np.nextafter(record["candidates"][3][1], 0.0))
    log.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(RunStateError, match="other candidates at generation 1"):
        run_search(load_config(None, raw=cfg), resume=True)


def test_new_run_over_existing_run_dir_is_refused(tmp_path):
    from search.config import ConfigError
    from search.loop import run_search

    cfg = raw_config(tmp_path, generations=2)
    run_search(cfg, max_generations=1)
    with pytest.raises(ConfigError, match="--resume"):
        run_search(cfg)


def test_resume_with_different_config_is_refused(tmp_path, capsys):
    from search.cli import main

    cfg_path = _config(tmp_path, "run")
    assert main(["--config", cfg_path, "--generations", "1", "--no-progress"]) == 0
    # Allowed: more generations (checked only, not run).
    assert main(["--resume", str(tmp_path / "run"), "--config", cfg_path, "--generations", "2", "--check"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(tmp_path / "run"), "--config", cfg_path, "--set", "search.sigma0=0.3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "differs from the one this run was started with" in err and "search.sigma0" in err


def _real_evaluator(target=None):
    from tiny_models import SPECS, build_patcher

    from search.evaluator import Evaluator
    from search.models import HashTextEncoder, ModelBundle
    from search.rewards import build_rewards

    spec = SPECS["flux"]
    bundle = ModelBundle(build_patcher("flux"), HashTextEncoder(spec.context[0], spec.context[1], spec.pooled),
                         name="tiny-flux")
    reward = build_rewards([{"name": "target", "images": target}]) if target is not None else None
    return Evaluator(bundle, reward, steps=2, latent_shape=spec.latent)


def test_real_evaluator_resume_matches(tmp_path):
    """The ComfyUI evaluator on a tiny FLUX (target reward): stopped and resumed with a fresh evaluator (as after a
    restart), the presets are byte-identical to one uninterrupted run."""
    pytest.importorskip("comfy")
    from calibri_core.calibration import Calibration, Member
    from search.config import load_config
    from search.loop import run_search

    probe = _real_evaluator()
    ident = probe.identity()
    hidden = Calibration(ident.family, "block", ident.sites, (Member((1.3, 1.0, 0.7, 1.0), 1.0),))
    target = probe.images(hidden, ["p"], 0)[0]

    def cfg(name):
        # The evaluator object is passed in, so the config's evaluator hook is not used.
        return raw_config(tmp_path, name, generations=4, val_every=2, popsize=4, bucket_size=2)

    ref = run_search(cfg("ref"), evaluator=_real_evaluator(target))
    run_search(cfg("part"), evaluator=_real_evaluator(target), max_generations=3)
    part = run_search(load_config(None, raw=cfg("part")), evaluator=_real_evaluator(target), resume=True)
    assert part.generations == 4 and ref.best_val is not None
    assert _outputs(tmp_path / "part") == _outputs(tmp_path / "ref")
