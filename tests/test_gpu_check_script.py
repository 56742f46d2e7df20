"""The prepared GPU check (tests/benchmarks/gpu_check.py, issue 9 item 8) runs as written, on the CPU (--smoke).

No GPU is needed or used: the smoke mode runs the same code path (run_search through the evaluator hook, the run
dir, the figures it prints) on the small FLUX-shaped model, so the script is known to work before a GPU is lent.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_smoke_runs_the_search_and_prints_its_figures():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "tests/benchmarks/gpu_check.py", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    figures = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [f["run"] for f in figures] == ["1 process"]
    assert figures[0]["generations"] == 2 and figures[0]["images"] == 2 * 4 * 2
    assert figures[0]["images_per_gpu_hour"] > 0 and figures[0]["pack"]["rows"] >= 1
