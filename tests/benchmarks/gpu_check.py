"""The prepared GPU check of the search (issue 9 item 8): one command, no network, under 8 minutes on one H100/H200.

1. ``run_search`` (the real loop, packed evaluator, CMA-ES, run dir, presets) for 3 generations on the full-size
   FLUX.1 architecture with random weights, bf16, 512², 15 steps, layer granularity, with a small random-weight
   reward (``bench_search.ConvReward``) and the weight-free hash text encoder;
2. the same run as a 2-process ``torchrun`` when 2 GPUs are visible (its presets must equal the 1-process run's
   only where both packed alike: the figures, not equality, are what is checked here);
3. ``bench_search.py --gpu`` (ours vs the reference-style loop vs the bare sampler + reward).

It prints the device, each run's wall time, generations, images per GPU-hour, the forward rows per pack and the peak
memory, for docs/benchmarks.md. ``--smoke`` runs step 1 on the CPU with the small FLUX-shaped model (how the test
suite checks that the script works on a machine without a GPU).

    python tests/benchmarks/gpu_check.py            # on the GPU machine, from the repository root
    python tests/benchmarks/gpu_check.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.append(path)

GENERATIONS = 3
BUCKET = 8
SMOKE_ENV = "CALIBRI_GPU_CHECK_SMOKE"


def _setup() -> dict:
    from bench_search import SETUPS

    if os.environ.get(SMOKE_ENV):  # as small as the code path allows: the smoke run checks the script, not speed
        return dict(SETUPS["cpu"], latent=(16, 8, 8), tokens=8, steps=2, popsize=4, bucket=2, generations=2)
    return dict(SETUPS["gpu"], popsize=8, bucket=BUCKET, generations=GENERATIONS)


def make_evaluator(config):
    """``search.evaluator`` hook: the random-weight FLUX.1 on this rank's device, hash encoder, ConvReward."""
    import torch
    from bench_search import ConvReward, build_patcher

    from search.evaluator import Evaluator
    from search.models import HashTextEncoder, ModelBundle

    setup = _setup()
    if setup["device"] == "cuda":
        setup["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    bundle = ModelBundle(build_patcher(setup), HashTextEncoder(setup["tokens"], setup["width"], 768),
                         name="FLUX.1 architecture, random weights")
    reward = ConvReward(setup["device"])
    smp = config.sampling
    return Evaluator(bundle, reward, steps=smp["steps"], width=smp["width"], height=smp["height"],
                     latent_shape=setup["latent"], guidance=smp["guidance"], device=torch.device(setup["device"]))


def _config(run_dir: Path, prompts: Path) -> dict:
    setup = _setup()
    side = setup["latent"][-1] * 8
    train, val = prompts / "train.txt", prompts / "val.txt"
    train.write_text("\n".join(f"gpu check prompt {i}" for i in range(16)) + "\n", encoding="utf-8")
    val.write_text("\n".join(f"gpu check validation prompt {i}" for i in range(setup["bucket"] // 2)) + "\n",
                   encoding="utf-8")
    return {
        "model": {"family": "flux", "name": "FLUX.1 architecture, random weights"},
        "search": {"evaluator": "python:gpu_check:make_evaluator", "generations": setup["generations"],
                   "popsize": setup["popsize"], "bucket_size": setup["bucket"], "val_every": setup["generations"]},
        "sampling": {"steps": setup["steps"], "width": side, "height": side},
        "prompts": {"train": str(train), "validation": str(val)},
        "output": {"run_dir": str(run_dir), "grid_prompts": 0, "plots": False},
        "rewards": [{"name": "target", "weight": 1.0}],
    }


def _report(label: str, run_dir: Path, wall: float, processes: int) -> dict:
    with open(run_dir / "generations.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    images = sum(r["popsize"] for r in records) * _setup()["bucket"]
    eval_s = sum(r.get("eval_s", 0.0) for r in records)
    figures = {"run": label, "processes": processes, "generations": len(records), "wall_s": round(wall, 1),
               "eval_s": round(eval_s, 1), "images": images,
               "images_per_gpu_hour": round(images / max(eval_s, 1e-9) * 3600 / processes),
               "pack": state.get("pack")}  # forward rows per pack and measured bytes per row (search.state)
    print(json.dumps(figures))
    return figures


def _worker(run_dir: str, prompts: str) -> None:
    """One rank of a run (also the 1-process run): activate the host, then ``run_search``."""
    from calibri_core import comfy_env

    comfy_env.activate(comfy_env.find_host(provision=False), cpu=bool(os.environ.get(SMOKE_ENV)))
    from search.loop import run_search

    run_search(_config(Path(run_dir), Path(prompts)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, small FLUX-shaped model: checks the script")
    parser.add_argument("--worker", nargs=2, metavar=("RUN_DIR", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        os.environ[SMOKE_ENV] = "1"
    if args.worker:
        _worker(*args.worker)
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs CUDA (use --smoke to check the script on a CPU)")
    gpus = 0 if args.smoke else torch.cuda.device_count()
    print(f"device: {torch.cuda.get_device_name() if gpus else 'cpu'} x {max(gpus, 1)}; torch {torch.__version__}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="calibri-gpu-check-") as tmp:
        runs = [("1 process", 1)] + ([("torchrun 2 processes", 2)] if gpus >= 2 else [])
        for label, procs in runs:
            run_dir, prompts = Path(tmp) / f"run{procs}", Path(tmp) / f"prompts{procs}"
            prompts.mkdir()
            cmd = [sys.executable, __file__, "--worker", str(run_dir), str(prompts)]
            if procs > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                       *cmd[1:]]
            t0 = time.time()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=240)
            _report(label, run_dir, time.time() - t0, procs)
    if not args.smoke:
        subprocess.run([sys.executable, str(HERE / "bench_search.py"), "--gpu", "--max-memory", "60GB",
                        "--repeats", "1"], check=True, env=env, cwd=ROOT, timeout=240)
    return 0


if __name__ == "__main__":
    sys.exit(main())
