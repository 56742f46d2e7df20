"""Search throughput benchmark (issue 4): a script that prints figures, not a test.

Compares, side by side in one process and on the same model, prompts, seeds and reward:

* ``ours``: ``search.evaluator.Evaluator`` — all candidates × prompts packed into large forward batches (one scale
  row per batch element), prompts encoded once (disk/memory cache), rewards scored per candidate bucket;
* ``reference-style``: the reference's loop shape — one candidate at a time (``apply_calibration``), micro-batch 4
  through ``comfy.sample.sample``, prompts re-encoded on every call, images given to the reward one micro-batch at a
  time;
* ``bare``: the unpatched sampler + decoder + reward on the same images in the same batch sizes as ``ours`` (the
  floor that the evaluator's overhead is measured against).

Run from the repository root::

    python tests/benchmarks/bench_search.py                 # CPU, small FLUX-shaped model
    python tests/benchmarks/bench_search.py --gpu --max-memory 60GB
        # CUDA: FLUX.1 architecture with random weights, bf16, 512², 15 steps, bucket 16, and a random-weight
        # reward stand-in with HPSv3's language-model size (28 layers, width 3584, 256 image + 600 text tokens)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

sys.path.append(str(ROOT / "tests"))
from tiny_models import flux1_unet  # noqa: E402

FLUX_CPU = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=256,
                hidden_size=256, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[16, 24, 24],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_GPU = dict(FLUX_CPU, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=19,
                depth_single_blocks=38, axes_dim=[16, 56, 56])
SETUPS = {
    "cpu": dict(unet=FLUX_CPU, latent=(16, 32, 32), tokens=64, width=256, steps=4, prompts=8, candidates=8,
                dtype=torch.float32, device="cpu", encoder_work=384),
    "gpu": dict(unet=FLUX_GPU, latent=(16, 64, 64), tokens=512, width=4096, steps=15, prompts=16, candidates=16,
                dtype=torch.bfloat16, device="cuda", encoder_work=4096),
}


def build_patcher(setup: dict):
    import comfy.model_patcher
    import comfy.supported_models as supported

    device = torch.device(setup["device"])
    config = supported.Flux(flux1_unet(setup["unet"]))
    config.set_inference_dtype(setup["dtype"], None)
    with torch.device(device):
        model = config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, tensor in sorted(model.diffusion_model.state_dict(keep_vars=True).items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32)
                         .mul_(0.02).to(tensor.dtype))
    model = model.to(setup["dtype"])
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=torch.device("cpu") if setup["device"] == "cuda" else device)


class ConvReward(torch.nn.Module):
    """CPU reward stand-in: a small random-weight conv net on 224² images (a CLIP-ish cost per image)."""

    def __init__(self, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 4, 4), torch.nn.GELU(), torch.nn.Conv2d(32, 64, 2, 2), torch.nn.GELU(),
            torch.nn.Conv2d(64, 128, 2, 2), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(128, 1))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        self.to(device)
        self.device = device

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = images.to(self.device).movedim(-1, 1)
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return self.net(x.float()).reshape(-1).float().cpu()


class HPSv3SizeReward(torch.nn.Module):
    """GPU reward stand-in with HPSv3's language-model size (Qwen2-VL-7B: 28 layers, width 3584, MLP 18944),
    random weights, bf16; 256 image tokens + 600 text tokens per image. Not HPSv3: only its cost."""

    def __init__(self, device: str, layers: int = 28):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(3584, 28, 18944, batch_first=True, norm_first=True, device=device,
                                             dtype=torch.bfloat16) for _ in range(layers))
        self.patch = torch.nn.Linear(3 * 28 * 28, 3584, device=device, dtype=torch.bfloat16)
        self.head = torch.nn.Linear(3584, 1, device=device, dtype=torch.float32)
        self.text = torch.nn.Parameter(torch.randn(1, 600, 3584, device=device, dtype=torch.bfloat16) * 0.02)
        self.device = device

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        x = images.to(self.device, torch.bfloat16).movedim(-1, 1)
        x = torch.nn.functional.interpolate(x, size=(448, 448), mode="bicubic", align_corners=False)
        tokens = torch.nn.functional.unfold(x, 28, stride=28).transpose(1, 2)  # [B, 256, 2352]
        h = torch.cat([self.patch(tokens), self.text.expand(x.shape[0], -1, -1)], dim=1)
        for layer in self.layers:
            h = layer(h)
        return self.head(h[:, -1].float()).reshape(-1).cpu()


def candidates(ev, count: int):
    from calibri_core.calibration import Calibration, Member

    ident = ev.identity("block")
    g = torch.Generator().manual_seed(1)
    out = [ident]
    for _ in range(count - 1):
        scales = (1 + 0.2 * torch.randn(len(ident.sites), generator=g)).tolist()
        out.append(Calibration(ident.family, "block", ident.sites, (Member(tuple(scales), 1.0),)))
    return out


def reference_style(ev, reward, encoder, cands, prompts, seed: int, micro: int = 4) -> torch.Tensor:
    """One candidate at a time, micro-batch ``micro``, prompts re-encoded per call, reward per micro-batch."""
    import comfy.sample

    from calibri_core.host import apply_calibration

    noise_all = ev.noise_for(prompts, seed)
    decoder = ev.bundle.make_decoder()
    fitness = []
    for cand in cands:
        model = apply_calibration(ev.model, cand)
        scores = []
        for start in range(0, len(prompts), micro):
            batch = prompts[start:start + micro]
            encoded = [encoder.encode(p) for p in batch]
            positive = [[torch.cat([e[0] for e in encoded]),
                         {"pooled_output": torch.cat([e[1]["pooled_output"] for e in encoded]),
                          "guidance": ev.guidance}]]
            noise = noise_all[start:start + micro]
            latents = comfy.sample.sample(model, noise, ev.steps, 1.0, "euler", "simple", positive, positive,
                                          torch.zeros_like(noise), seed=seed, disable_pbar=True)
            with torch.no_grad():
                images = decoder.decode(latents).float().cpu()
            scores.append(reward.score(images, batch))
        fitness.append(torch.cat(scores).mean())
    return torch.stack(fitness)


def bare(ev, reward, cands, prompts, seed: int) -> None:
    """Unpatched sampler + decoder + reward on K·P images in the evaluator's batch size (pre-encoded prompts)."""
    import comfy.sample

    total = len(cands) * len(prompts)
    rows = max(1, min(total, int(ev.stats.get("forward_rows", total))))
    noise_all = ev.noise_for(prompts, seed)
    decoder = ev.bundle.make_decoder()
    pairs = [(k, p) for k in range(len(cands)) for p in range(len(prompts))]
    for start in range(0, total, rows):
        pack = pairs[start:start + rows]
        texts = [prompts[p] for _, p in pack]
        cond = [[torch.cat([ev._encodings[t][0] for t in texts]),
                 {"pooled_output": torch.cat([ev._encodings[t][1]["pooled_output"] for t in texts]),
                  "guidance": ev.guidance}]]
        noise = noise_all[torch.tensor([p for _, p in pack])]
        latents = comfy.sample.sample(ev.model, noise, ev.steps, 1.0, "euler", "simple", cond, cond,
                                      torch.zeros_like(noise), seed=seed, disable_pbar=True)
        with torch.no_grad():
            images = decoder.decode(latents).float().cpu()
        for s in range(0, len(pack), len(prompts)):
            reward.score(images[s:s + len(prompts)], texts[s:s + len(prompts)])


def peak(device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # monotone process peak, GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, full-size FLUX.1 architecture, bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--max-memory", default=None, help="evaluator memory cap, e.g. 60GB (CUDA: allocated)")
    parser.add_argument("--batch-size", default="auto", help="evaluator forward rows per pack ('auto' or a number)")
    parser.add_argument("--candidates", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=0)
    parser.add_argument("--latent", type=int, default=0, help="latent side (default 32 on CPU = 256², 64 on GPU)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA; none is visible")
    if args.threads:
        torch.set_num_threads(args.threads)

    from calibri_core import comfy_env

    comfy_env.activate(cpu=not args.gpu)
    from search.evaluator import Evaluator
    from search.models import HashTextEncoder, ModelBundle
    from search.prompts import default_prompts

    setup = dict(SETUPS["gpu" if args.gpu else "cpu"])
    if args.latent:
        setup["latent"] = (16, args.latent, args.latent)
    K = args.candidates or setup["candidates"]
    P = args.prompts or setup["prompts"]
    prompts = default_prompts("train")[:P]
    encoder = HashTextEncoder(setup["tokens"], setup["width"], 768, work=setup["encoder_work"])
    patcher = build_patcher(setup)
    reward = HPSv3SizeReward("cuda") if args.gpu else ConvReward("cpu")
    ev = Evaluator(ModelBundle(patcher, encoder, name="flux-random"), reward, steps=setup["steps"],
                   latent_shape=setup["latent"], max_memory=args.max_memory, device=setup["device"],
                   batch_size=args.batch_size if args.batch_size == "auto" else int(args.batch_size))
    cands = candidates(ev, K)
    ev.prepare(prompts)

    # warm-up (model load, kernels), then interleaved timed repeats
    ev.evaluate(cands[:2], prompts[:2], seed=0)
    times = {"ours": [], "reference-style": [], "bare": []}
    peaks = {}
    for r in range(args.repeats):
        for name in times:
            if args.gpu:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            if name == "ours":
                fit = ev.evaluate(cands, prompts, seed=100 + r)
            elif name == "reference-style":
                fit_ref = reference_style(ev, reward, encoder, cands, prompts, seed=100 + r)
            else:
                bare(ev, reward, cands, prompts, seed=100 + r)
            if args.gpu:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks.get(name, 0.0), peak(setup["device"]))
    agree = float((fit - fit_ref).abs().max())

    images = K * P
    print(f"# bench_search {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}"
          f" torch {torch.__version__} threads {torch.get_num_threads()} device {setup['device']}")
    print(f"model: FLUX-shaped {setup['unet']['hidden_size']} wide, {setup['unet']['depth']}+"
          f"{setup['unet']['depth_single_blocks']} blocks, latent {setup['latent']}, {setup['steps']} steps; "
          f"{K} candidates x {P} prompts = {images} images per evaluation; {args.repeats} repeats, median")
    print(f"evaluator forward rows per pack: {ev.stats.get('forward_rows')}, max_memory "
          f"{args.max_memory or 'auto'}, evaluator peak {ev.peak_bytes / 2 ** 30:.2f} GiB")
    print(f"{'loop':<16} {'s/eval':>8} {'images/s':>9} {'cand/s':>8} {'peak GiB':>9}")
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in times:
        print(f"{name:<16} {med[name]:8.2f} {images / med[name]:9.2f} {K / med[name]:8.3f} {peaks[name]:9.2f}")
    print(f"ours / reference-style candidate evaluations per second: {med['reference-style'] / med['ours']:.2f}x")
    print(f"ours overhead over bare sampler + reward: {100 * (med['ours'] / med['bare'] - 1):+.1f} %")
    print(f"max |fitness ours - reference-style| = {agree:.2e}")
    if args.max_memory:
        from search.evaluator import parse_bytes

        cap = parse_bytes(args.max_memory)
        print(f"peak {ev.peak_bytes / 2 ** 30:.2f} GiB {'<=' if ev.peak_bytes <= cap else '>'} max_memory "
              f"{cap / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
