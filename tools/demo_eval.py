"""Sample the demo model through ComfyUI's own nodes and score it with the rule-based metric (reward ``demo_rules``).

    python tools/demo_eval.py calibri_core/demo/calibri-demo.safetensors --split heldout --count 64 \\
        --steps 8 --cfg 1 3 5

Per setting: CLIPTextEncode on the returned CLIP, EmptyChromaRadianceLatentImage, ComfyUI's KSampler (common_ksampler)
and VAEDecode, then the rule-based score with its mean and 95 % interval (1.96 standard errors over prompts), and the
share of prompts whose colours, shapes, sizes and positions are all right. Prompts and noise are seeded. A grid PNG
of the first images of each setting is written with ``--grid``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # after the script's own folder, never before a ComfyUI host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[8])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--grid", default="")
    args = parser.parse_args(argv)

    from calibri_core import comfy_env

    comfy_env.activate(comfy_env.find_host(provision=False))
    import numpy as np
    import torch

    from calibri_core.demo import model as demo
    from calibri_core.demo import scenes
    from search.rewards import demo_rules

    torch.set_num_threads(2)
    model, clip, vae = demo.load(args.weights)
    prompts = scenes.prompts(args.split, args.count, args.seed)
    rows = []
    for steps in args.steps:
        for cfg in args.cfg:
            images = demo.sample(model, clip, vae, prompts, steps=steps, cfg=cfg, seed=args.seed,
                                 sampler=args.sampler, scheduler=args.scheduler)
            scores = demo_rules.score(images.float().cpu().numpy(), prompts)
            mean, half = float(np.mean(scores)), 1.96 * float(np.std(scores, ddof=1)) / math.sqrt(len(scores))
            print(f"{args.split} steps {steps} cfg {cfg:g}: demo_rules {mean:.3f} ± {half:.3f}, all right "
                  f"{float(np.mean(scores >= 1.0)):.3f} over {len(prompts)} prompts", flush=True)
            rows.append(images[:8].cpu().numpy())
    if args.grid:
        from PIL import Image

        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).resize(
            (grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.grid)
        print("prompts of the grid's columns:", *prompts[:8], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
