"""Engine overhead benchmark (issue 2 §4): a script that prints figures, not a test.

Measures, through ComfyUI's real sampler path (``comfy.sample.sample_custom`` with a custom KSAMPLER
that times each guided denoiser call):

1. per-step time of a Flux-shaped model with a gate-granularity calibration applied versus the
   unpatched model, interleaved in one process (median, IQR, median of paired ratios);
2. one batch-2 forward carrying two calibrations (``apply_row_scales``) versus two batch-1 forwards;
3. peak memory of a sampling run with and without a calibration, each in a fresh subprocess, plus a
   direct check that no parameter was copied.

Run from the repository root::

    python tests/benchmarks/bench_engine.py            # CPU: small Flux (hidden 512, 4+8 blocks)
    python tests/benchmarks/bench_engine.py --gpu      # CUDA, bf16, full-size Flux.1 with random weights
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

sys.path.append(str(ROOT / "tests"))
from tiny_models import FLUX_PARAMS, flux1_unet, host_fields  # noqa: E402

# Model shapes. CPU: small Flux. GPU: Flux.1 dev architecture (12B parameters).
FLUX_CPU = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=512, mlp_ratio=4.0, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=[16, 24, 24],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_GPU = dict(FLUX_CPU, hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56])
# Flux.2: one modulation layer shared by all blocks, so Calibri scales branch outputs (in place) rather than
# modulation chunks: the family the memory target is about. GPU: FLUX.2 dev's block layout (8 double, 48 single).
FLUX2_CPU = dict(image_model="flux2", in_channels=32, out_channels=32, vec_in_dim=None, context_in_dim=1024,
                 hidden_size=512, mlp_ratio=3.0, num_heads=8, depth=4, depth_single_blocks=8,
                 axes_dim=[16, 16, 16, 16], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
                 global_modulation=True, mlp_silu_act=True, ops_bias=False)
FLUX2_GPU = dict(FLUX2_CPU, in_channels=128, out_channels=128, context_in_dim=15360, hidden_size=6144, num_heads=48,
                 depth=8, depth_single_blocks=48, axes_dim=[32, 32, 32, 32])
SETUPS = {
    "cpu": dict(unet=FLUX_CPU, latent=(16, 64, 64), text_tokens=64, dtype=torch.float32, device="cpu"),
    "gpu": dict(unet=FLUX_GPU, latent=(16, 128, 128), text_tokens=512, dtype=torch.bfloat16, device="cuda"),
    "cpu-flux2": dict(unet=FLUX2_CPU, latent=(32, 32, 32), text_tokens=64, dtype=torch.float32, device="cpu"),
    "gpu-flux2": dict(unet=FLUX2_GPU, latent=(128, 64, 64), text_tokens=512, dtype=torch.bfloat16, device="cuda"),
}


def setup_for(gpu: bool, family: str) -> dict:
    return SETUPS[("gpu" if gpu else "cpu") + ("" if family == "flux" else f"-{family}")]
BIG = 1 << 20  # tensors of at least 1 MiB count as "large" in the copy check


def activate(gpu: bool) -> None:
    from calibri_core import comfy_env

    comfy_env.activate(cpu=not gpu)


# ---------------------------------------------------------------- model, conditioning, calibration

def build_patcher(setup: dict, seed: int = 0):
    """A ComfyUI Flux ModelPatcher with random weights (randn · 0.02, seeded), built on its device."""
    import comfy.model_patcher
    import comfy.supported_models

    device = torch.device(setup["device"])
    if setup["unet"]["image_model"] == "flux2":
        config = comfy.supported_models.Flux2(dict(setup["unet"], **host_fields(FLUX_PARAMS, {"txt_ids_dims": [3]})))
    else:
        config = comfy.supported_models.Flux(flux1_unet(setup["unet"]))
    config.set_inference_dtype(setup["dtype"], None)
    model = config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.diffusion_model.state_dict(keep_vars=True).items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device, dtype=tensor.dtype) * 0.02)
    model = model.to(setup["dtype"])
    offload = torch.device("cpu") if setup["device"] == "cuda" else device
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)


def conditioning(setup: dict, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, setup["text_tokens"], setup["unet"]["context_in_dim"], generator=generator)
    vec = setup["unet"]["vec_in_dim"]
    pooled = torch.randn(1, vec, generator=generator) if vec else None
    return [[context, {"pooled_output": pooled, "guidance": 3.5}]]


def random_calibration(patcher, seed: int):
    """A one-member gate-granularity calibration whose every scale differs from 1 (0.8…1.2, never 1)."""
    from calibri_core.calibration import Calibration, Member
    from calibri_core.host import model_layout

    _, layout = model_layout(patcher)
    sites = layout.site_names("gate")
    generator = torch.Generator().manual_seed(seed)
    magnitude = 0.01 + 0.19 * torch.rand(len(sites), generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(len(sites), generator=generator) < 0.5, -1.0, 1.0).double()
    scales = tuple(float(s) for s in 1 + sign * magnitude)
    assert all(s != 1.0 for s in scales)
    return Calibration(layout.family, "gate", sites, (Member(scales),))


# ---------------------------------------------------------------- timing through the sampler path

def sync(setup: dict) -> None:
    if setup["device"] == "cuda":
        torch.cuda.synchronize()


def timed_sampler(setup: dict, times: list, on_loaded=None, cpu_times: list | None = None):
    """A KSAMPLER doing Euler steps; it records the wall (and process CPU) time of every denoiser call."""
    import comfy.samplers

    def run(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        if on_loaded is not None:
            on_loaded()
        x = noise
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i] * x.new_ones([x.shape[0]])
            sync(setup)
            start, cpu_start = time.perf_counter(), time.process_time()
            denoised = model(x, sigma, **extra_args)
            sync(setup)
            times.append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - cpu_start)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    return comfy.samplers.KSAMPLER(run)


def run_sampling(patcher, setup: dict, steps: int, batch: int = 1, seed: int = 0, on_loaded=None,
                 cpu_times: list | None = None) -> list[float]:
    """One comfy.sample.sample_custom run of ``steps`` steps (cfg 1: one model call per step)."""
    import comfy.sample
    import comfy.samplers

    times: list[float] = []
    empty = torch.zeros((batch,) + setup["latent"])
    noise = comfy.sample.prepare_noise(empty, seed)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    positive = conditioning(setup)
    with torch.inference_mode():
        out = comfy.sample.sample_custom(patcher, noise, 1.0, timed_sampler(setup, times, on_loaded, cpu_times), sigmas,
                                         positive, positive, empty, disable_pbar=True, seed=seed)
    if not torch.isfinite(out).all():
        raise RuntimeError("benchmark model produced non-finite output")
    return times


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[0], q[2]


def bench_overhead(setup: dict, reps: int, steps: int, warmup: int) -> dict:
    from calibri_core.host import apply_calibration

    base = build_patcher(setup)
    calibrated = apply_calibration(base, random_calibration(base, seed=7))
    variants = {"unpatched": base, "calibrated": calibrated}
    for _ in range(warmup):
        for patcher in variants.values():
            run_sampling(patcher, setup, steps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios, cpu_ratios = [], []
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        got, cpu = {}, {name: [] for name in variants}
        for name in order:
            got[name] = run_sampling(variants[name], setup, steps, cpu_times=cpu[name])
        for name in variants:
            times[name] += got[name]
        ratios += [c / u for c, u in zip(got["calibrated"], got["unpatched"])]
        cpu_ratios += [c / u for c, u in zip(cpu["calibrated"], cpu["unpatched"])]
    return dict(times=times, ratios=ratios, cpu_ratios=cpu_ratios)


def bench_isolated(setup: dict, iterations: int = 2000) -> dict:
    """The engine's own work per step, timed without the model around it (noise-free estimate).

    Calls each patched modulation forward of a calibrated clone with the scales active, against the
    original forward on the same input, and the APPLY_MODEL wrapper around a no-op executor.
    """
    import comfy.patcher_extension

    from calibri_core.host import PATCH_KEY, apply_calibration

    base = build_patcher(setup)
    calibrated = apply_calibration(base, random_calibration(base, seed=7))
    device, dtype = torch.device(setup["device"]), setup["dtype"]

    def input_for(key: str) -> torch.Tensor:  # one token of the width the patched module reads
        module = base.get_model_object(key[: -len(".forward")])
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        return torch.randn(1, first.in_features, device=device, dtype=dtype)

    def clock(fn) -> float:
        for _ in range(20):
            fn()
        sync(setup)
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync(setup)
        return (time.perf_counter() - start) / iterations

    rows = torch.tensor(calibrated_rows(calibrated), dtype=torch.float32)
    patched_total = original_total = 0.0
    modules = 0
    with torch.inference_mode():
        for key, forward in calibrated.object_patches.items():
            if not key.endswith(".forward") or "active" not in forward.__code__.co_freevars:
                continue
            active = forward.__closure__[forward.__code__.co_freevars.index("active")].cell_contents
            original = base.get_model_object(key)
            vec = input_for(key)
            active.set(rows, device)
            patched_total += clock(lambda: forward(vec))
            active.set(None, device)
            original_total += clock(lambda: original(vec))
            modules += 1
        wrapper = calibrated.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL][PATCH_KEY][0]
        x = torch.randn((1,) + setup["latent"], device=device, dtype=dtype)
        t = torch.ones(1, device=device)
        options = {"sigmas": t}

        class Executor:  # the wrapper reads the BaseModel it wraps (its model_sampling) from class_obj
            class_obj = base.model

            def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
                return x

        executor = Executor()

        wrapped = clock(lambda: wrapper(executor, x, t, None, None, None, options))
        bare = clock(lambda: executor(x, t, None, None, None, options))
    return dict(modules=modules, forwards=patched_total - original_total, wrapper=wrapped - bare)


def calibrated_rows(patcher) -> list:
    from calibri_core.host import model_layout

    _, layout = model_layout(patcher)
    return random_calibration(patcher, seed=7).gate_scales(layout)


def bench_batched(setup: dict, reps: int, steps: int, warmup: int) -> dict:
    from calibri_core.host import apply_calibration, apply_row_scales, model_layout

    base = build_patcher(setup)
    _, layout = model_layout(base)
    cal_a, cal_b = random_calibration(base, seed=7), random_calibration(base, seed=8)
    rows = torch.tensor(cal_a.gate_scales(layout) + cal_b.gate_scales(layout), dtype=torch.float32)
    batched = apply_row_scales(base, lambda options, batch: rows)
    one_a, one_b = apply_calibration(base, cal_a), apply_calibration(base, cal_b)
    for _ in range(warmup):
        run_sampling(batched, setup, steps, batch=2)
        run_sampling(one_a, setup, steps)
        run_sampling(one_b, setup, steps)
    joint, separate, ratios = [], [], []
    for rep in range(reps):
        if rep % 2 == 0:
            b = run_sampling(batched, setup, steps, batch=2)
            a1, a2 = run_sampling(one_a, setup, steps), run_sampling(one_b, setup, steps)
        else:
            a1, a2 = run_sampling(one_a, setup, steps), run_sampling(one_b, setup, steps)
            b = run_sampling(batched, setup, steps, batch=2)
        pair = [x + y for x, y in zip(a1, a2)]
        joint += b
        separate += pair
        ratios += [x / y for x, y in zip(b, pair)]
    return dict(joint=joint, separate=separate, ratios=ratios)


# ---------------------------------------------------------------- memory (one fresh process per variant)

def status_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return status_bytes("VmRSS")


def heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_peak_tracker(model):
    """Bytes in use in the C heap (glibc mallinfo2: small blocks + mmap'd blocks, where torch's CPU tensors live),
    sampled before and after every module's forward. Unlike RSS it does not depend on what the allocator keeps
    mapped, so the two variants' peaks compare to the byte. Returns (peak dict, hook handles); None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None, []
    peak = {"bytes": 0}

    def sample(*_):
        info = libc.mallinfo2()
        peak["bytes"] = max(peak["bytes"], info.uordblks + info.hblkhd)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(sample))
        handles.append(module.register_forward_hook(sample))
    return peak, handles


def large_tensors(exclude: set[int]) -> list[tuple[tuple, str]]:
    """Shapes of live tensors ≥ 1 MiB whose storage is not one of ``exclude`` (the model's parameters)."""
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() >= BIG:
                if obj.untyped_storage().data_ptr() not in exclude:
                    found.append((tuple(obj.shape), str(obj.dtype)))
        except Exception:  # noqa: BLE001 - some objects refuse inspection; they are not our tensors
            continue
    return sorted(found)


def memory_child(variant: str, gpu: bool, steps: int, family: str = "flux") -> dict:
    """Measure one variant in this (fresh) process; returns figures as a dict."""
    setup = setup_for(gpu, family)
    from calibri_core.host import apply_calibration

    base = build_patcher(setup)
    diffusion_model = base.model.diffusion_model
    params = {name: t.data_ptr() for name, t in diffusion_model.state_dict(keep_vars=True).items()}
    param_bytes = sum(t.numel() * t.element_size() for t in diffusion_model.state_dict().values())
    patcher = apply_calibration(base, random_calibration(base, seed=7)) if variant == "calibrated" else base
    gc.collect()
    storages = {t.untyped_storage().data_ptr() for t in diffusion_model.state_dict().values()}
    baseline_rss = rss_bytes()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = reset_peak_rss()
    baseline_rss = rss_bytes()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    seen: dict = {}

    def on_loaded():  # inside the run: the calibration's patches are in place
        seen["moved"] = sorted(n for n, t in diffusion_model.state_dict(keep_vars=True).items()
                               if t.data_ptr() != params[n])
        seen["extra_large"] = large_tensors(storages)

    heap, handles = (None, []) if gpu else heap_peak_tracker(diffusion_model)
    heap_start = heap_in_use() if heap is not None else 0
    run_sampling(patcher, setup, steps, on_loaded=on_loaded)
    for handle in handles:
        handle.remove()
    peak_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = dict(variant=variant, param_bytes=param_bytes, baseline_rss=baseline_rss,
                  baseline_maxrss=baseline_maxrss, peak_maxrss=peak_maxrss, hwm_reset=reset,
                  peak_hwm=status_bytes("VmHWM"),
                  moved_in_run=seen["moved"], extra_large_in_run=seen["extra_large"],
                  moved_after=sorted(n for n, t in diffusion_model.state_dict(keep_vars=True).items()
                                     if t.data_ptr() != params[n]))
    if gpu:
        result.update(baseline_cuda=baseline_cuda, peak_cuda=torch.cuda.max_memory_allocated())
    if heap is not None:
        result.update(heap_start=heap_start, heap_peak=heap["bytes"])
    return result


def bench_memory(gpu: bool, steps: int, family: str = "flux") -> dict:
    out = {}
    for variant in ("unpatched", "calibrated"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant, "--steps", str(steps),
               "--family", family]
        cmd += ["--gpu"] if gpu else []
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- report

def machine(gpu: bool) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = (f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if gpu:
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, full-size Flux.1 (random weights)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions of the overhead pair")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per run")
    parser.add_argument("--batch-reps", type=int, default=None, help="repetitions of the batched-members pair")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=("unpatched", "calibrated"), help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=("flux", "flux2"), default="flux",
                        help="flux: FLUX.1-shaped (gates are modulation chunks); flux2: FLUX.2-shaped (gated branch "
                             "outputs, scaled in place)")
    args = parser.parse_args(argv)
    activate(args.gpu)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    if not args.gpu:
        torch.set_num_threads(2)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.gpu, args.steps or 2, args.family)))
        return 0
    setup = setup_for(args.gpu, args.family)
    reps = args.reps or (20 if args.gpu else 12)
    steps = args.steps or (5 if args.gpu else 2)
    batch_reps = args.batch_reps or (10 if args.gpu else 3)
    unet = setup["unet"]
    patch = unet["patch_size"]
    tokens = (setup["latent"][1] // patch) * (setup["latent"][2] // patch)
    print(f"Calibri engine benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine(args.gpu)}; load average at start {os.getloadavg()[0]:.2f}")
    print(f"model: {unet['image_model']}, hidden {unet['hidden_size']}, {unet['depth']} double + "
          f"{unet['depth_single_blocks']} single blocks, {unet['num_heads']} heads, axes_dim {unet['axes_dim']}; "
          f"latent {setup['latent']} ({tokens} image tokens) + {setup['text_tokens']} text tokens, batch 1, "
          f"{str(setup['dtype']).replace('torch.', '')}, {setup['device']}; "
          f"calibration: gate granularity, random scales in 1±[0.01, 0.2]")
    print(f"step = one guided denoiser call inside comfy.sample.sample_custom (cfg 1); "
          f"{reps} interleaved reps × {steps} steps, 1 warm-up rep\n")

    started = time.perf_counter()
    overhead = bench_overhead(setup, reps, steps, warmup=1)
    print("1. per-step time, calibrated vs unpatched (interleaved)")
    print(f"   {'variant':<12} {'n':>4} {'median ms':>10} {'Q1 ms':>9} {'Q3 ms':>9} {'min ms':>9}")
    for name, values in overhead["times"].items():
        med, q1, q3 = median_iqr(values)
        print(f"   {name:<12} {len(values):>4} {ms(med):>10} {ms(q1)} {ms(q3)} {ms(min(values))}")
    med, q1, q3 = median_iqr(overhead["ratios"])
    medians = [statistics.median(v) for v in overhead["times"].values()]
    print(f"   paired ratio calibrated/unpatched: median {med:.4f} (IQR {q1:.4f}–{q3:.4f}); "
          f"ratio of medians {medians[1] / medians[0]:.4f}; target ≤ 1.02")
    mins = [min(v) for v in overhead["times"].values()]
    med, q1, q3 = median_iqr(overhead["cpu_ratios"])
    print(f"   ratio of minima {mins[1] / mins[0]:.4f}; paired ratio of process CPU time: median {med:.4f} "
          f"(IQR {q1:.4f}–{q3:.4f})")
    isolated = bench_isolated(setup)
    per_step = isolated["forwards"] + isolated["wrapper"]
    print(f"   isolated engine work per step: {isolated['modules']} patched module forwards "
          f"+{isolated['forwards'] * 1e6:.0f} µs, APPLY_MODEL wrapper +{isolated['wrapper'] * 1e6:.0f} µs; "
          f"total {per_step * 1e3:.2f} ms = {100 * per_step / medians[0]:.3f} % of the unpatched median step")
    print(f"   [{time.perf_counter() - started:.0f} s]\n")

    started = time.perf_counter()
    batched = bench_batched(setup, batch_reps, steps, warmup=1)
    print("2. two calibrations: one batch-2 forward (apply_row_scales, 2 rows) vs two batch-1 forwards")
    for label, key in (("batch 2, 2 rows", "joint"), ("2 × batch 1", "separate")):
        med, q1, q3 = median_iqr(batched[key])
        print(f"   {label:<16} n={len(batched[key]):>3} median {ms(med)} ms (IQR {ms(q1).strip()}–{ms(q3).strip()})")
    med, q1, q3 = median_iqr(batched["ratios"])
    print(f"   paired ratio batched/separate: median {med:.4f} (IQR {q1:.4f}–{q3:.4f})")
    print(f"   [{time.perf_counter() - started:.0f} s]\n")

    if not args.skip_memory:
        started = time.perf_counter()
        memory = bench_memory(args.gpu, 2, args.family)
        print("3. memory of a 2-step sampling run, each variant in a fresh process (MiB)")
        print("   run peak = VmHWM after resetting it once the model is built; lifetime peak = ru_maxrss")
        print(f"   {'variant':<12} {'RSS at start':>12} {'run peak':>10} {'run peak−start':>15} {'lifetime peak':>14}"
              + (f" {'CUDA start':>11} {'CUDA peak':>10}" if args.gpu else ""))
        for name, m in memory.items():
            line = (f"   {name:<12} {mib(m['baseline_rss']):>12} {mib(m['peak_hwm']):>10} "
                    f"{mib(m['peak_hwm'] - m['baseline_rss']):>15} {mib(m['peak_maxrss']):>14}")
            if args.gpu:
                line += f" {mib(m['baseline_cuda']):>11} {mib(m['peak_cuda']):>10}"
            print(line)
        u, c = memory["unpatched"], memory["calibrated"]
        if not (u["hwm_reset"] and c["hwm_reset"]):
            print("   (could not reset VmHWM: run peak includes the model build)")
        print(f"   run peak calibrated/unpatched: {c['peak_hwm'] / u['peak_hwm']:.4f}; difference "
              f"{(c['peak_hwm'] - u['peak_hwm']) / 2**20:+.1f} MiB; growth over start calibrated/unpatched "
              f"{(c['peak_hwm'] - c['baseline_rss']) / (u['peak_hwm'] - u['baseline_rss']):.4f} "
              f"(weights {u['param_bytes'] / 2**20:.1f} MiB); target ≤ 1.01")
        if args.gpu:
            print(f"   peak CUDA calibrated/unpatched: {c['peak_cuda'] / u['peak_cuda']:.4f}")
        if "heap_peak" in u and "heap_peak" in c:
            print(f"   C-heap peak during the run (mallinfo2, sampled at every module boundary): unpatched "
                  f"{mib(u['heap_peak']).strip()} MiB, calibrated {mib(c['heap_peak']).strip()} MiB, ratio "
                  f"{c['heap_peak'] / u['heap_peak']:.4f}, difference {(c['heap_peak'] - u['heap_peak']) / 2**20:+.2f} "
                  f"MiB; target ≤ 1.01")
        print(f"   parameters moved/copied (data_ptr changed) during the calibrated run: {len(c['moved_in_run'])}, "
              f"after it: {len(c['moved_after'])}")
        print(f"   live tensors ≥ 1 MiB outside the weights while patched: calibrated {len(c['extra_large_in_run'])}, "
              f"unpatched {len(u['extra_large_in_run'])}"
              + ("" if c["extra_large_in_run"] == u["extra_large_in_run"] else
                 f"; calibrated-only: {sorted(set(c['extra_large_in_run']) - set(u['extra_large_in_run']))}"))
        print(f"   [{time.perf_counter() - started:.0f} s]")
    print(f"load average at end {os.getloadavg()[0]:.2f} (1 min; other processes share these cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
