"""Train the demo model (calibri_core/demo/model.py) on the procedural scenes, on CPU, seeded.

    python tools/demo_train.py --steps 6000 --out calibri_core/demo/calibri-demo.safetensors

Flow matching in ComfyUI's own sampling convention: the loss is taken on ``BaseModel.apply_model``'s denoised output
(x_t = (1 − σ)·x0 + σ·noise, σ logit-normal), divided by σ, which is exactly the velocity error, so the trained model
is sampled by ComfyUI with nothing translated. Pixels in [−1, 1] as ComfyUI's pixel-space VAE hands them over.
Captions are dropped (replaced by the empty prompt) with probability ``--drop``, so CFG and negative ensemble members
have an unconditional prediction to work with. AdamW with a linear warm-up and a cosine decay; the weights saved are
an exponential moving average. A CSV of (step, seconds, loss) is written beside the output for the docs' loss curve.
The host is found as ``python -m calibri_core.comfy_env`` finds it and never installed here.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # after the script's own folder, never before a ComfyUI host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--drop", type=float, default=0.1, help="caption dropout probability")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from calibri_core import comfy_env

    comfy_env.activate(comfy_env.find_host(provision=False))
    import comfy.model_management
    import numpy as np
    import torch

    from calibri_core.demo import model as demo
    from calibri_core.demo import scenes

    # ComfyUI's fused inference kernels (comfy_kitchen's RoPE) have no backward; this flag selects the torch ones.
    comfy.model_management.in_training = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = demo.build_base_model()
    demo.init_weights(base.diffusion_model, args.seed)
    text = demo.TextEncoder()
    with torch.no_grad():
        text.words.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(args.seed + 1))
        text.positions.normal_(0, 0.1, generator=torch.Generator().manual_seed(args.seed + 2))
    params = list(base.diffusion_model.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    count = sum(p.numel() for p in params)
    print(f"demo model: {count / 1e6:.2f} M parameters ({sum(p.numel() for p in text.parameters())} in the text "
          f"encoder); {args.steps} steps of {args.batch}", flush=True)

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    log_path = out.with_suffix(".loss.csv")
    log = open(log_path, "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "seconds", "loss"])
    t0, running = time.time(), None

    def save_ema(step: int) -> None:
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        demo.save(str(out), base.diffusion_model, text, extra={"training": {
            "steps": step, "batch": args.batch, "lr": args.lr, "seed": args.seed, "caption_dropout": args.drop,
            "ema": args.ema, "seconds": round(time.time() - t0, 1), "loss": running}})
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)

    for step in range(1, args.steps + 1):
        images, captions = scenes.samples("train", (step - 1) * args.batch + args.seed * 10**9, args.batch)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        captions = ["" if rng.random() < args.drop else c for c in captions]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(args.batch)).clamp(1e-3, 1.0)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        # guidance 0: what ComfyUI's Chroma conditioning hands the model (Chroma is not guidance-distilled)
        # ComfyUI's blocks update the residual in place (img += ...), which autograd refuses when the old value was
        # saved for the backward pass; saving a copy instead keeps ComfyUI's forward exactly as it samples.
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
            denoised = base.apply_model(x_t, sigma, c_crossattn=text.encode(captions),
                                        guidance=torch.zeros(args.batch))
        loss = (((denoised - x0) / s) ** 2).mean()
        lr = args.lr * min(1.0, step / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for p, e in zip(params, ema):
                e.lerp_(p.detach(), 1 - args.ema)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 25 == 0 or step == 1:
            writer.writerow([step, round(time.time() - t0, 2), round(value, 5)])
            log.flush()
        if step % 100 == 0:
            print(f"step {step}: loss {running:.4f}, {time.time() - t0:.0f} s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_ema(step)
    log.close()
    print(f"saved {out} ({out.stat().st_size / 2**20:.1f} MiB) and {log_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
