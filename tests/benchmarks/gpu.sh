#!/usr/bin/env bash
# The GPU checks of the engine and ensemble benchmarks as one command (issue 8): on one H100/H200, from the
# repository root, with the host importable (python -m calibri_core.comfy_env where). Prints figures for
# docs/benchmarks.md; meant to finish well inside 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'needs CUDA'; print(torch.cuda.get_device_name())"
timeout 300 python tests/benchmarks/bench_engine.py --gpu --reps 10 --steps 4 --batch-reps 5
timeout 150 python tests/benchmarks/bench_ensemble.py --gpu --reps 6 --steps 4
timeout 120 python tests/benchmarks/bench_engine.py --gpu --family flux2 --reps 3 --steps 2 --batch-reps 1
