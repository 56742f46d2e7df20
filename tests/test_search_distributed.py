"""torchrun with 2 processes (gloo, CPU) gives the same presets as one process with the same seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_search_loop import raw_config, to_toml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _outputs(run_dir) -> dict:
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in ("calibri-best.safetensors", "calibri-last-mean.safetensors")}


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    from search.loop import run_search

    cfg = raw_config(tmp_path, "multi", generations=8, val_every=3)
    path = tmp_path / "multi.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    # Each rank appends the candidate indices it scored, to check the work really was split.
    env["CALIBRI_TEST_SHARD_LOG"] = str(tmp_path / "shards")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "search", "--config", str(path), "--no-progress", "--log-level", "WARNING"],
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]

    single = run_search(raw_config(tmp_path, "single", generations=8, val_every=3))
    assert _outputs(tmp_path / "multi") == _outputs(os.path.dirname(single.best_preset))
    calls = {rank: int(open(tmp_path / f"shards.{rank}").read()) for rank in (0, 1)}
    assert calls[0] > 0 and calls[1] > 0, calls
    assert abs(calls[0] - calls[1]) <= 8 + 2, calls  # round-robin: at most one candidate apart per evaluation
