"""Hostile and careless input to the search (issue 10, search side): nothing in a run dir is unpickled, no file is
lost, no refusal is a traceback, and the run state is checked before any model is loaded.

Most cases run the real CLI (``python -m search``) in a subprocess on the fast fake evaluator
(``python:test_search_loop:QuadraticEvaluator``), as tests/test_search_resume.py does; the cases about the model
(loaded after the state check; the pack size) use a tiny model file or the tiny in-process FLUX with the weight-free
``target`` reward.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_search_loop import raw_config, to_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
PRESETS = ("calibri-best.safetensors", "calibri-last-mean.safetensors")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search", "--no-progress", "--log-level", "WARNING", *args]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, one ``calibri-search: error: Calibri: ...`` line holding every ``expected`` text, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith("calibri-search: error: Calibri: ")]
    assert len(lines) == 1, err[-4000:]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def _config_file(tmp_path, name: str = "run", **search) -> str:
    cfg = raw_config(tmp_path, name, **{"generations": 3, "val_every": 2, "popsize": 4, **search})
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return str(path)


def _started(tmp_path, name: str = "run", generations: int = 2) -> str:
    """A run dir stopped after ``generations`` of 3 (in-process), to be resumed by the CLI."""
    from search.loop import run_search

    run_search(raw_config(tmp_path, name, generations=3, val_every=2, popsize=4), max_generations=generations)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """One run dir stopped after 2 of 3 generations, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("stopped")
    _started(root)
    return root


def _files(run_dir, lock: bool = False) -> dict:
    """The run dir's files and bytes; without ``lock``, not run.lock (every attempt rewrites the PID in it)."""
    return {name: open(os.path.join(run_dir, name), "rb").read() for name in sorted(os.listdir(run_dir))
            if os.path.isfile(os.path.join(run_dir, name)) and (lock or name != "run.lock")}


# ------------------------------------------------------------------ 1. no pickle in a run dir

def test_replayed_optimizer_asks_what_the_uninterrupted_one_asks():
    """pycma with its private seed is a function of its ask/tell history: replaying the logged exchanges (JSON
    round trip included) gives a strategy whose next ask equals the uninterrupted one's bit for bit."""
    from search.optimizer import CMAOptimizer, ReplayMismatch

    d = 23
    args = (np.ones(d), 0.25, [-1.0] * d, [2.0] * d, None, 11)
    target = np.linspace(-0.5, 1.7, d)
    live, log = CMAOptimizer(*args), []
    for _ in range(25):
        xs = live.ask()
        live.tell([float(((x - target) ** 2).sum()) for x in xs])
        live.stop_reasons()  # as the loop does once per generation
        log.append(json.loads(json.dumps(live.exchange())))
    replayed = CMAOptimizer.replay(*args, log)
    assert replayed.sigma == live.sigma and replayed.mean.tobytes() == live.mean.tobytes()
    assert np.array(replayed.ask()).tobytes() == np.array(live.ask()).tobytes()
    edited = json.loads(json.dumps(log))
    edited[7]["candidates"][2][5] = float(np.nextafter(edited[7]["candidates"][2][5], 9.0))  # one ulp
    with pytest.raises(ReplayMismatch, match="generation 8"):
        CMAOptimizer.replay(*args, edited)


def test_run_dir_holds_no_pickle(tmp_path):
    """Every file a run leaves (stopped mid-run and finished) is JSON, safetensors or PNG: none is a pickle."""
    from search.config import load_config
    from search.loop import run_search

    run_dir = _started(tmp_path)
    cfg = raw_config(tmp_path, "run", generations=3, val_every=2, popsize=4)
    for stage in ("stopped", "finished"):
        names = sorted(os.listdir(run_dir))
        assert "state.json" in names and "optimizer.jsonl" in names, names
        for name, data in _files(run_dir, lock=True).items():
            assert not name.endswith((".pkl", ".pickle", ".pt")), (stage, name)
            assert not data.startswith(b"\x80"), f"{stage}: {name} starts like a pickle"
            if name.endswith((".json", ".jsonl")):
                for line in data.decode("utf-8").splitlines() if name.endswith(".jsonl") else [data.decode()]:
                    json.loads(line)
        if stage == "stopped":
            run_search(load_config(None, raw=cfg), resume=True)


class _Payload:
    """Unpickling this writes the marker file: what a hostile optimiser checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_in_a_run_dir_is_never_loaded(tmp_path):
    """An old-format run dir (state version 1 naming ``optimizer-*.pkl`` with its correct SHA-256, the form a hostile
    pickle takes) is refused with a message; the pickle does not run."""
    import hashlib

    run_dir = _started(tmp_path)
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(str(marker)), protocol=4)
    name = "optimizer-000002.pkl"
    (tmp_path / "run" / name).write_bytes(blob)
    state_path = tmp_path / "run" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(version=1, optimizer={"file": name, "sha256": hashlib.sha256(blob).hexdigest()})
    state_path.write_text(json.dumps(state))
    before = _files(run_dir)
    for args in (("--resume", run_dir), ("--resume", run_dir, "--check")):
        _refused(_run(*args), repr(run_dir), name, "never loaded", "new run")
        assert not marker.exists(), "the pickle ran"
    assert _files(run_dir) == before


# ------------------------------------------------------------------ 2. nothing lost

def test_overwrite_false_keeps_an_existing_preset(tmp_path):
    """``output.overwrite = false`` (the default): an existing ``output.preset`` stops the run before any sampling,
    and ``--check`` says so; with ``overwrite = true`` the run replaces it."""
    config = _config_file(tmp_path, "run", generations=1)
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own preset")
    for extra in (("--check",), ()):
        proc = _run("--config", config, "--preset", str(mine), *extra)
        _refused(proc, repr(str(mine)), "output.overwrite", "--set output.overwrite=true")
        assert mine.read_bytes() == b"the user's own preset"
        assert not (tmp_path / "run" / "state.json").exists() and not (tmp_path / "run" / "config.json").exists()
    proc = _run("--config", config, "--preset", str(mine), "--set", "output.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mine.read_bytes() == (tmp_path / "run" / "calibri-best.safetensors").read_bytes()


def test_resumed_run_may_replace_only_its_own_preset_copy(tmp_path):
    """A finished run resumed for more generations replaces the ``output.preset`` copy it wrote itself, but not a
    file that someone put there since."""
    from search.config import ConfigError, load_config
    from search.loop import run_search

    preset = tmp_path / "copy.safetensors"
    cfg = raw_config(tmp_path, "run", generations=2, val_every=2, popsize=4)
    cfg["output"]["preset"] = str(preset)
    run_search(cfg)
    first = preset.read_bytes()
    result = run_search(load_config(None, {"search.generations": 4}, raw=cfg), resume=True)
    assert result.generations == 4 and preset.read_bytes() != first
    preset.write_bytes(b"someone else's file")
    with pytest.raises(ConfigError, match="output.overwrite"):
        run_search(load_config(None, {"search.generations": 5}, raw=cfg), resume=True)
    assert preset.read_bytes() == b"someone else's file"


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    """While one process runs, a second ``--resume`` (and ``--check``) is refused naming the holder's PID and
    changes nothing; once the holder is killed (SIGKILL: its lock file stays), ``--resume`` runs."""
    cfg = raw_config(tmp_path, "run", generations=30, val_every=3, popsize=4)
    cfg["model"]["options"] = {"sleep": 0.5}
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg), encoding="utf-8")
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(_cli("--config", str(config)), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "state.json").is_file():
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read()
            time.sleep(0.05)
        for extra in ((), ("--check",)):
            _refused(_run("--resume", str(run_dir), *extra), f"in use by process {holder.pid}", repr(str(run_dir)))
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / "run.lock").is_file()
    stopped = json.loads((run_dir / "state.json").read_text())["generation"]
    proc = _run("--resume", str(run_dir), "--generations", str(stopped + 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in log] == list(range(1, stopped + 2))


# ------------------------------------------------------------------ 3. refusals are messages

def _break_toml(path: str, case: str) -> str:
    data = open(path, "rb").read()
    if case == "invalid UTF-8":
        data = data.replace(b'name = "tiny-flux"', b'name = "tiny-\xff\xfeflux"')
    elif case == "5000-digit integer":
        data = data.replace(b"seed = 3", b"seed = " + b"9" * 5000)
    else:
        data += b"deep = " + b"[" * 5000 + b"]" * 5000 + b"\n"
    open(path, "wb").write(data)
    return path


@pytest.mark.parametrize("case", ["invalid UTF-8", "deeply nested", "5000-digit integer"])
def test_unreadable_toml_is_a_message(tmp_path, case):
    config = _break_toml(_config_file(tmp_path), case)
    _refused(_run("--config", config, "--check"), repr(config), "config file")


# (file, how it is damaged, what the message says)
_DAMAGE = {
    "state.json truncated": ("state.json", lambda t: t[: len(t) // 2], "not valid JSON"),
    "state.json generation is text": ("state.json", lambda t: _edit(t, generation="2"), "generation"),
    "state.json without rng": ("state.json", lambda t: _edit(t, rng=None), "rng"),
    "state.json best_train.x of text": ("state.json", lambda t: _edit(t, best_train={"x": "1", "fitness": 1.0,
                                                                                    "generation": 1}), "best_train.x"),
    "state.json NaN": ("state.json", lambda t: t.replace('"elapsed_s": ', '"elapsed_s": NaN, "x": '), "NaN"),
    "state.json huge integer": ("state.json", lambda t: t.replace('"generation": 2', '"generation": ' + "9" * 5000),
                                "not valid JSON"),
    "state.json not UTF-8": ("state.json", lambda t: t.replace('"finished"', '"fin\udcffished"'), "UTF-8"),
    "config.json truncated": ("config.json", lambda t: t[: len(t) // 2], "not valid JSON"),
    "config.json a list": ("config.json", lambda t: "[]", "not a table"),
    "config.json output a number": ("config.json", lambda t: _edit(t, output=5), "config.json"),
    "config.json seed is text": ("config.json", lambda t: _edit(t, search={**json.loads(t)["search"], "seed": "3"}),
                                 "search.seed"),
    "optimizer.jsonl truncated": ("optimizer.jsonl", lambda t: t[: len(t) // 3], "optimiser log"),
    "optimizer.jsonl candidate edited": ("optimizer.jsonl", lambda t: _edit_candidate(t), "other candidates"),
}


def _edit(text: str, **fields) -> str:
    data = json.loads(text)
    data.update(fields)
    return json.dumps(data)


def _edit_candidate(text: str) -> str:
    lines = text.splitlines()
    record = json.loads(lines[1])
    record["candidates"][1][0] = float(np.nextafter(record["candidates"][1][0], 9.0))
    lines[1] = json.dumps(record)
    return "\n".join(lines) + "\n"


# Also run as a plain --resume (the same check, before the model loads); the edited candidate is found only by the
# replay, which needs the search space, so not by --check.
_PLAIN_RESUME = ("state.json truncated", "state.json without rng", "config.json a list",
                 "optimizer.jsonl candidate edited")


@pytest.mark.parametrize("case", list(_DAMAGE))
def test_damaged_run_state_is_a_message(tmp_path, stopped_run, case):
    """``--check --resume`` (and for some ``--resume``): one line naming the damaged file, exit 2, nothing
    changed."""
    import shutil

    name, damage, expected = _DAMAGE[case]
    shutil.copytree(stopped_run, tmp_path, dirs_exist_ok=True)
    run_dir = str(tmp_path / "run")
    path = os.path.join(run_dir, name)
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8", errors="surrogateescape").write(damage(text))
    before = _files(run_dir)
    variants = ([] if "edited" in case else [("--check",)]) + ([()] if case in _PLAIN_RESUME else [])
    for extra in variants:
        line = _refused(_run("--resume", run_dir, *extra), expected)
        assert name in line, line
    assert _files(run_dir) == before


@pytest.mark.parametrize("override", ["sampling.cfg=nan", "sampling.guidance=inf", "search.scale_bounds=[-inf, 2]",
                                      "search.cfg_start=nan", "search.weight_bounds=[-10, nan]", "search.seed=-1",
                                      "search.val_seed=" + "9" * 5000])
def test_non_finite_or_unusable_numbers_are_refused_by_check(tmp_path, override):
    key = override.split("=")[0]
    expected = "finite" if "n" in override.split("=")[1] else "seed"
    _refused(_run("--config", _config_file(tmp_path), "--check", "--set", override), key, expected)


def test_damaged_state_is_refused_before_the_model_loads(tmp_path):
    """``--resume`` on a run dir with a damaged state.json, whose model file is not a model: the message is about
    state.json (read first), not the model; ``--check --resume`` says the same."""
    pytest.importorskip("comfy")
    from search.config import load_config
    from search.loop import prepare_run_dir

    fake = tmp_path / "not-a-model.safetensors"
    fake.write_bytes(b"not a model")
    cfg = raw_config(tmp_path, "run", generations=3, evaluator="comfy")
    cfg["model"] = {"family": "sd3", "diffusion_model": str(fake), "options": {"clip_type": "hash"}}
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg), encoding="utf-8")
    prepare_run_dir(load_config(str(config)), resume=False)
    (tmp_path / "run" / "state.json").write_text('{"version": 2, "generation": 1, "hist')
    for extra in ((), ("--check",)):
        _refused(_run("--resume", str(tmp_path / "run"), *extra), "state.json", "not valid JSON")


def test_missing_reward_file_is_a_message(tmp_path):
    """The ``target`` reward's file is absent, the default HPSv3 reward has no weights configured: one line naming
    the reward, the file or the setting, exit 2, before the model is loaded, and the run dir holds nothing."""
    pytest.importorskip("comfy")
    import server_harness

    model = server_harness.write_models(tmp_path / "models")["unet"]
    cfg = raw_config(tmp_path, "run", generations=1, evaluator="comfy", bucket_size=1)
    cfg["model"] = {"family": "sd3", "diffusion_model": str(model), "options": {"clip_type": "hash"}}
    cfg["sampling"] = {"steps": 1, "width": 64, "height": 64}
    missing = tmp_path / "absent-target.safetensors"
    cfg["rewards"] = [{"name": "target", "path": str(missing)}]
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg), encoding="utf-8")
    _refused(_run("--config", str(config)), "rewards[0] (target)", str(missing))
    cfg["rewards"] = [{"name": "hpsv3"}]  # the default reward, its weights not configured
    config.write_text(to_toml(cfg), encoding="utf-8")
    _refused(_run("--config", str(config), "--run-dir", str(tmp_path / "run2")), "rewards[0] (hpsv3)",
             "CALIBRI_HPSV3_CHECKPOINT")
    for run_dir in ("run", "run2"):
        assert not os.listdir(tmp_path / run_dir)


# ------------------------------------------------------------------ 4. the pack size is run state

def _real_evaluator(target=None, max_memory=None):
    """The ComfyUI evaluator on the tiny FLUX (as tests/test_search_resume.py builds it), ``target`` reward."""
    from tiny_models import SPECS, build_patcher

    from search.evaluator import Evaluator
    from search.models import HashTextEncoder, ModelBundle
    from search.rewards import build_rewards

    spec = SPECS["flux"]
    bundle = ModelBundle(build_patcher("flux"), HashTextEncoder(spec.context[0], spec.context[1], spec.pooled),
                         name="tiny-flux")
    reward = build_rewards([{"name": "target", "images": target}]) if target is not None else None
    return Evaluator(bundle, reward, steps=2, latent_shape=spec.latent, max_memory=max_memory)


def test_pack_size_is_recorded_and_reused_on_resume(tmp_path):
    """The pack size generation 1 used (``stats["forward_rows"]``) and its measured per-row memory are in
    state.json; a resumed run packs with the recorded size even where its own memory budget would choose fewer
    rows, and ends with the uninterrupted run's bytes."""
    pytest.importorskip("comfy")
    from search.config import load_config
    from search.loop import run_search

    def cfg(name):
        return raw_config(tmp_path, name, generations=3, val_every=3, popsize=4, bucket_size=2)

    probe = _real_evaluator()
    target = probe.images(probe.identity(), ["p"], 0)[0]
    uninterrupted = _real_evaluator(target)
    run_search(cfg("ref"), evaluator=uninterrupted)
    first = _real_evaluator(target)
    run_search(cfg("part"), evaluator=first, max_generations=1)
    pack = json.loads((tmp_path / "part" / "state.json").read_text())["pack"]
    assert pack["rows"] == first.stats["forward_rows"] == uninterrupted.batch_size
    assert pack["per_row_bytes"] == (first._per_row if first._per_row is None else pytest.approx(first._per_row))
    starved = _real_evaluator(target, max_memory=1)  # its own budget: 1 row per pack
    assert starved.max_rows() == 1 < pack["rows"]
    run_search(load_config(None, raw=cfg("part")), evaluator=starved, resume=True)
    assert starved.batch_size == pack["rows"] == starved.stats["forward_rows"]
    for name in PRESETS:
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


class PackingEvaluator:
    """``python:test_search_hostile:PackingEvaluator``: the quadratic evaluator with the packing attributes of the
    ComfyUI one (``batch_size``, ``stats["forward_rows"]``, ``_per_row``). With ``batch_size = "auto"`` rank r packs
    at most 2 + 3 r rows (as ranks with different free memory would); every call's ``batch_size`` is logged."""

    def __init__(self, config):
        from test_search_loop import QuadraticEvaluator

        self.inner = QuadraticEvaluator(config)
        self.layout = self.inner.layout
        self.rank = int(os.environ.get("RANK", "0"))
        self.batch_size, self.stats, self._per_row = "auto", {}, None
        self.log = os.path.join(os.environ["CALIBRI_TEST_PACK_LOG"], f"rank{self.rank}.jsonl")

    def evaluate(self, candidates, prompts, seed):
        rows = len(candidates) * len(prompts)
        limit = self.batch_size if isinstance(self.batch_size, int) else 2 + 3 * self.rank
        self.stats["forward_rows"] = max(self.stats.get("forward_rows", 0), min(rows, limit))
        self._per_row = 1000.0 + self.rank
        with open(self.log, "a") as f:
            f.write(json.dumps(self.batch_size) + "\n")
        return self.inner.evaluate(candidates, prompts, seed)


@pytest.mark.slow
def test_every_rank_packs_with_rank_0s_recorded_size(tmp_path):
    """Under torchrun the pack size rank 0 measured in generation 1 is recorded and, from generation 2 on, every
    rank's evaluator uses it (its ``batch_size``), not its own memory budget."""
    cfg = raw_config(tmp_path, "run", generations=4, val_every=2, popsize=6, bucket_size=2,
                     evaluator="python:test_search_hostile:PackingEvaluator", candidates_per_call=1)
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg), encoding="utf-8")
    env = {**_env(), "CALIBRI_TEST_PACK_LOG": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "search", "--config", str(config), "--no-progress", "--log-level", "WARNING"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pack = json.loads((tmp_path / "run" / "state.json").read_text())["pack"]
    assert pack == {"rows": 2, "per_row_bytes": 1000.0}  # rank 0's: 2 rows (rank 1 alone would pack 5)
    for rank in (0, 1):
        sizes = [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
        first = sizes.index(2)  # generation 1 ran on each rank's own budget ("auto")
        assert first > 0 and set(sizes[:first]) == {"auto"} and set(sizes[first:]) == {2}, (rank, sizes)
        assert len(sizes) - first >= 3 * 3, (rank, sizes)  # generations 2-4: 3 candidates a rank each
