"""Ensemble step benchmark (issue 3): a script that prints figures, not a test.

Times one CalibriEnsembleGuider step with N = 2 members (positive and negative prompt, each with its own gate-
granularity calibration) on the small CPU Flux-shaped model of ``bench_engine.py`` (hidden 512, 4 double + 8 single
blocks, 64×64 latent), batched (both members in one forward of batch 2) versus ``low_vram`` (two forwards of batch
1), and ComfyUI's own CFGGuider at cfg 4 (also two passes in one batch) for scale. The variants are interleaved in
one process; figures are medians over the repetitions.

Run from the repository root::

    python tests/benchmarks/bench_ensemble.py [--reps 12] [--steps 4]
    python tests/benchmarks/bench_ensemble.py --gpu   # CUDA, bf16, full-size FLUX.1 (random weights) at 512²
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine as be  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="denoiser calls per timed run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, full-size FLUX.1 at 512² (random weights)")
    args = parser.parse_args(argv)
    be.activate(gpu=args.gpu)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    torch.set_num_threads(args.threads)
    import comfy.sample
    import comfy.samplers

    from calibri_core.calibration import Calibration, Member
    from calibri_core.sampling import EnsembleGuider

    setup = dict(be.SETUPS["gpu"], latent=(16, 64, 64)) if args.gpu else be.SETUPS["cpu"]
    patcher = be.build_patcher(setup)
    first, second = be.random_calibration(patcher, 1), be.random_calibration(patcher, 2)
    ensemble = Calibration(first.family, first.granularity, first.sites,
                           (Member(first.members[0].scales, 4.0, "positive"),
                            Member(second.members[0].scales, -3.0, "negative")))
    positive, negative = be.conditioning(setup, seed=1), be.conditioning(setup, seed=2)

    def cfg_guider():
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_cfg(4.0)
        return guider

    variants = {
        "ensemble N=2, batched": lambda: EnsembleGuider(patcher, ensemble),
        "ensemble N=2, low_vram": lambda: EnsembleGuider(patcher, ensemble, low_vram=True),
        "CFGGuider cfg 4 (reference)": cfg_guider,
    }
    empty = torch.zeros((1,) + setup["latent"], device=setup["device"])
    noise = comfy.sample.prepare_noise(empty, 0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", args.steps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for name, make in variants.items():
            guider = make()
            guider.set_conds(positive, negative)
            step_times: list[float] = []
            with torch.no_grad():
                guider.sample(noise, empty, be.timed_sampler(setup, step_times), sigmas, seed=0, disable_pbar=True)
            if rep:
                times[name] += step_times
    print(f"machine: {be.machine(args.gpu)}; torch {torch.__version__}, {args.threads} threads; latent "
          f"{setup['latent']}, {str(setup['dtype']).replace('torch.', '')}, {setup['device']}")
    print(f"{args.reps} runs x {args.steps} steps per variant, interleaved; one step = one guided denoiser call")
    base = statistics.median(times["ensemble N=2, batched"])
    for name, values in times.items():
        median, q1, q3 = be.median_iqr(values)
        print(f"  {name:30s} median {be.ms(median)}  IQR {be.ms(q1)}–{be.ms(q3)}  ({median / base:.2f}x batched)")
    low_vram = statistics.median(times["ensemble N=2, low_vram"])
    print(f"batched speed-up over two sequential forwards (low_vram): {low_vram / base:.2f}x; GPU target ≥ 1.3x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
