"""The search under torch.distributed (gloo, CPU): 2 processes give the same presets as one with the same seed, and
a failure on any rank ends every rank within seconds with that failure's message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from test_search_loop import QuadraticEvaluator, raw_config, to_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
FAIL_MESSAGE = "injected failure 7f3a"
# From the failure to the last process's exit; without the fail-fast protocol the other rank waits for gloo's
# 30-minute timeout.
FAIL_WITHIN_S = 30


def _outputs(run_dir) -> dict:
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in ("calibri-best.safetensors", "calibri-last-mean.safetensors")}


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    from search.loop import run_search

    cfg = raw_config(tmp_path, "multi", generations=8, val_every=3)
    path = tmp_path / "multi.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    # Each rank appends the candidate indices it scored, to check the work really was split.
    env = _env(CALIBRI_TEST_SHARD_LOG=str(tmp_path / "shards"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "search", "--config", str(path), "--no-progress", "--log-level", "WARNING"],
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]

    single = run_search(raw_config(tmp_path, "single", generations=8, val_every=3))
    assert _outputs(tmp_path / "multi") == _outputs(os.path.dirname(single.best_preset))
    calls = {rank: int(open(tmp_path / f"shards.{rank}").read()) for rank in (0, 1)}
    assert calls[0] > 0 and calls[1] > 0, calls
    assert abs(calls[0] - calls[1]) <= 8 + 2, calls  # round-robin: at most one candidate apart per evaluation


class FailingEvaluator(QuadraticEvaluator):
    """``python:test_search_distributed:FailingEvaluator``: QuadraticEvaluator that raises on rank
    ``CALIBRI_TEST_FAIL_RANK`` at ``CALIBRI_TEST_FAIL_AT``: "setup" (in the factory), "evaluate" (its first
    evaluator call: generation 1) or "finish" (rank 0 reading ``model_info`` after the loop, outside any
    evaluation). The time of the failure goes to ``CALIBRI_TEST_FAIL_TIME``."""

    def __init__(self, config):
        self._fails = os.environ.get("RANK", "0") == os.environ["CALIBRI_TEST_FAIL_RANK"]
        self._at = os.environ["CALIBRI_TEST_FAIL_AT"]
        if self._fails and self._at == "setup":
            self._fail()
        super().__init__(config)
        self.sleep = 0.2  # the other rank is busy when the failure happens

    def _fail(self):
        with open(os.environ["CALIBRI_TEST_FAIL_TIME"], "w") as f:
            f.write(repr(time.time()))
        raise ValueError(f"{FAIL_MESSAGE} on rank {os.environ.get('RANK')}")

    def evaluate(self, candidates, prompts, seed):
        if self._fails and self._at == "evaluate":
            self._fail()
        return super().evaluate(candidates, prompts, seed)

    def __getattribute__(self, name):
        if name == "model_info" and object.__getattribute__(self, "_fails") and \
                object.__getattribute__(self, "_at") == "finish":
            object.__getattribute__(self, "_fail")()
        return object.__getattribute__(self, name)


def _failing_run(tmp_path, rank: int, at: str) -> tuple[str, dict]:
    cfg = raw_config(tmp_path, "failing", generations=4, val_every=2,
                     evaluator="python:test_search_distributed:FailingEvaluator", candidates_per_call=1)
    path = tmp_path / "failing.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return str(path), _env(CALIBRI_TEST_FAIL_RANK=str(rank), CALIBRI_TEST_FAIL_AT=at,
                           CALIBRI_TEST_FAIL_TIME=str(tmp_path / "failed_at"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list, deadline_s: float) -> list[float]:
    """Poll until every process has exited (or kill them all at the deadline); their end times."""
    ends: list = [None] * len(procs)
    start = time.time()
    while any(e is None for e in ends):
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.time()
        if time.time() - start > deadline_s:
            for p in procs:
                p.kill()
            pytest.fail(f"still running after {deadline_s} s: {[e is None for e in ends]}")
        time.sleep(0.05)
    return ends


def _failed_at(tmp_path) -> float:
    return float((tmp_path / "failed_at").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("rank, at", [(1, "evaluate"), (0, "evaluate"), (1, "setup"), (0, "finish")])
def test_a_failing_rank_ends_every_rank(tmp_path, rank, at):
    """Two plain processes (no torchrun to kill the survivor): both exit non-zero within seconds of the failure,
    each with the failing rank's message; the failing rank raises its own exception, the other RankFailed."""
    config, env = _failing_run(tmp_path, rank, at)
    port = str(_free_port())
    procs, logs = [], []
    for r in (0, 1):
        log = open(tmp_path / f"rank{r}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "search", "--config", config, "--no-progress", "--log-level", "WARNING"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
    ends = _wait(procs, 240)
    for log in logs:
        log.close()
    outputs = [(tmp_path / f"rank{r}.log").read_text(errors="replace") for r in (0, 1)]
    failed_at = _failed_at(tmp_path)
    for r, (proc, end, output) in enumerate(zip(procs, ends, outputs)):
        assert proc.returncode != 0, f"rank {r} exited 0:\n{output[-3000:]}"
        assert f"{FAIL_MESSAGE} on rank {rank}" in output, f"rank {r}:\n{output[-3000:]}"
        assert end - failed_at < FAIL_WITHIN_S, (r, end - failed_at)
    assert f"ValueError: {FAIL_MESSAGE}" in outputs[rank]
    assert f"RankFailed: Calibri: rank {rank} failed: ValueError: {FAIL_MESSAGE}" in outputs[1 - rank]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_torchrun_fails_fast(tmp_path, rank):
    """``torchrun --standalone --nproc_per_node=2`` with rank ``rank``'s evaluator raising at generation 1: torchrun
    exits non-zero within seconds, its output carrying the failing rank's message (the other rank's RankFailed
    may not get printed: torchrun stops it as soon as the failing rank exits)."""
    config, env = _failing_run(tmp_path, rank, "evaluate")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "search", "--config", config, "--no-progress", "--log-level", "WARNING"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    end = time.time()
    text = output.decode(errors="replace")
    assert proc.returncode != 0, text[-4000:]
    assert end - _failed_at(tmp_path) < FAIL_WITHIN_S, end - _failed_at(tmp_path)
    assert f"ValueError: {FAIL_MESSAGE} on rank {rank}" in text, text[-4000:]


_HASH_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
import search.models as models
calls = []
real = models.file_sha256
models.file_sha256 = lambda path, cache_dir=None: calls.append(str(path)) or real(path, cache_dir)
dist.init_process_group("gloo")
digests = models.shared_sha256([Path(p) for p in sys.argv[1:]], None)
try:
    models.shared_sha256([Path(sys.argv[1] + ".absent")], None)
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"calls": calls, "digests": digests, "error": error}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_model_files_are_hashed_once(tmp_path):
    """``load_bundle``'s digests (``shared_sha256``): rank 0 hashes, rank 1 gets the digests; rank 0 failing to
    hash fails both ranks with its message."""
    import hashlib
    import json

    files = []
    for i in range(2):
        files.append(tmp_path / f"model{i}.safetensors")
        files[-1].write_bytes(bytes(range(256)) * (i + 3))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _HASH_SCRIPT, *map(str, files)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    expected = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert [r["digests"] for r in results] == [expected, expected]
    assert results[0]["calls"] == [str(files[0]), str(files[1]), str(files[0]) + ".absent"]
    assert results[1]["calls"] == []
    assert results[0]["error"].startswith("FileNotFoundError")
    assert results[1]["error"] == f"RankFailed: Calibri: rank 0 failed: {results[0]['error']}"


def test_hash_memo_uses_its_own_temp_file(tmp_path, monkeypatch):
    """``file_sha256``'s memo goes through ``write_bytes_atomic`` (a unique temp name per write, never a shared
    ``sha256.tmp``)."""
    import hashlib
    import json

    import search.models as models

    written = []
    real = models.write_bytes_atomic
    monkeypatch.setattr(models, "write_bytes_atomic", lambda path, data: written.append(path) or real(path, data))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 100)
    cache = tmp_path / "cache"
    digest = models.file_sha256(model, cache)
    assert digest == hashlib.sha256(model.read_bytes()).hexdigest()
    assert written == [cache / "sha256.json"] and sorted(os.listdir(cache)) == ["sha256.json"]
    assert list(json.loads((cache / "sha256.json").read_text()).values()) == [digest]
    assert models.file_sha256(model, cache) == digest and len(written) == 1  # remembered
