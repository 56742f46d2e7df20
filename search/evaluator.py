"""Fitness of Calibri candidates: sample images with ComfyUI's own sampler and model code, score them with a reward.

One generation evaluates K candidates (``Calibration`` objects) on the same P prompts with the same noise (common
random numbers: the noise of prompt p comes from the seed and is identical for every candidate). All K·P images are
sampled in few, large forward batches: each batch row is one (candidate, prompt, member) pass and carries its own
gate scales through ``calibri_core.host.apply_row_scales``; an ensemble step combines its members exactly,
F = Σ ω_i f_{s_i}(x, t, p_i), in ComfyUI's x0 space as x + Σ ω_i (x0_i − x) (reference/comfyui.md C), with the
arithmetic of the nodes' ensembles (``calibri_core.ensemble.combine_x0`` and ``rescale_x0``). The number of
rows per forward is found from free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: available RAM) or capped by
``max_memory``, and corrected after every pack from the measured peak.

Prompts are encoded once and cached on disk (safetensors, keyed by the text encoder's SHA-256 and the prompt); the
text encoder is freed after encoding. Sampling uses a deterministic sampler (euler by default): ancestral/SDE
samplers draw extra noise for the whole packed batch, so their images depend on how candidates were packed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from calibri_core.calibration import Calibration, Member
from calibri_core.ensemble import Term, combine_x0, plan_terms, rescale_reference, rescale_x0
from calibri_core.host import apply_row_scales, model_layout, token_patch

from .models import ModelBundle, free_encoder, load_bundle
from .schedule import SamplingSchedule

log = logging.getLogger("calibri")

ROWS_KEY = "calibri_search_rows"
"""transformer_options key: the [rows, gates] scale table of the forward in flight (one row per batch element)."""

CPU_ROWS = 8
"""Auto batch cap on CPU, where a forward is compute-bound and big batches only lose cache locality: the search
benchmark's evaluation took 34.7 s with 64 rows per pack and 24.1 s with 8 (docs/benchmarks.md)."""
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


def parse_bytes(value: Any) -> Optional[int]:
    """``None``/``"auto"`` → None; a number of bytes; or a string such as ``"20GB"`` / ``"18GiB"``."""
    if value in (None, "", "auto", 0):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMG]I?B|B)?", str(value).strip().upper().replace(" ", ""))
    if match is None:
        raise ValueError(f"Calibri: max_memory {value!r} is not a size; write bytes or e.g. '20GB', '18GiB'.")
    number, unit = match.group(1), match.group(2) or ""
    return int(float(number) * _UNITS[unit])


def _none_extras(path: Path) -> list[str]:
    """Extras an encoding cached in ``path`` had as None (safetensors holds tensors only; the names are metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("none_extras", "[]"))


def _host_passes_attention_mask(model: Any) -> bool:
    """Whether this host's BaseModel hands a conditioning's ``attention_mask`` to the diffusion model: ComfyUI 0.33's
    QwenImage does, 0.3.75's drops it (padding would then be attended to, so texts of other lengths stay apart)."""
    try:
        mask = torch.ones(1, 1, dtype=torch.long)
        out = model.model.extra_conds(cross_attn=torch.zeros(1, 1, 1), attention_mask=mask)
    except Exception:  # a model whose extra_conds needs more than a text: no padding, never a wrong forward
        return False
    return "attention_mask" in out


def _token_mask(cond: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[1, T] long, 1 for a token the model attends to (the text encoder's own mask where it gave one)."""
    return torch.ones(1, cond.shape[1], dtype=torch.long) if mask is None else mask.long()


def _row_source(options: dict, batch: int) -> Optional[torch.Tensor]:
    rows = options.get(ROWS_KEY)
    if rows is not None and rows.shape[0] != batch:
        raise RuntimeError(f"Calibri: search forward has {batch} rows but {rows.shape[0]} scale rows.")
    return rows


@dataclass
class _Group:
    """Rows of one forward pass: passes whose conditioning tensors have the same shapes."""

    key: str
    pairs: torch.Tensor      # [n] long: which sampler row (pair) each pass belongs to
    rows: torch.Tensor       # [n, gates] gate scales
    weights: torch.Tensor    # [n] float64 ω (a pair's only pass of ω exactly 1 gives the pair its x0 bit-exactly)
    reference: torch.Tensor  # [n] bool: the pass whose velocity norm a rescaled ensemble keeps (Qwen-Image)
    conditioning: list


class _PackGuider:
    """Builds a ComfyUI GUIDER that samples one pack of (candidate, prompt) pairs as one batch."""

    @staticmethod
    def make(model: Any, groups: list[_Group], rescale_patch: Optional[int]):
        import comfy.samplers

        class PackGuider(comfy.samplers.CFGGuider):
            def predict_noise(self, x, timestep, model_options={}, seed=None):
                t = timestep if timestep.shape[0] == x.shape[0] else timestep.expand(x.shape[0])
                x0s = []
                reference = torch.zeros_like(x) if rescale_patch else None
                for g in groups:
                    pairs = g.pairs.to(x.device)
                    options = dict(model_options)
                    options["transformer_options"] = dict(options.get("transformer_options", {}), **{ROWS_KEY: g.rows})
                    x0s.append(comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[g.key]], x[pairs],
                                                              t[pairs], options)[0])
                    if reference is not None and bool(g.reference.any()):
                        mask = g.reference.to(x.device)
                        reference[pairs[mask]] = x0s[-1][mask]
                out = combine_x0(x, x0s, [g.weights for g in groups], [g.pairs for g in groups])
                return out if reference is None else rescale_x0(x, out, reference, t, rescale_patch)

        guider = PackGuider(model)
        guider.inner_set_conds({g.key: g.conditioning for g in groups})
        return guider


class _PeakMeter:
    """Peak memory of a block: CUDA allocator peak, or process RSS polled every 10 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current(device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device)
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self) -> "_PeakMeter":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(0.01):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current(self.device))


def _get(cfg: Any, section: str, key: str, default: Any = None) -> Any:
    """Read ``cfg[section][key]`` from a RunConfig-like object or nested dict; flat dicts are accepted too."""
    part = getattr(cfg, section, None) if not isinstance(cfg, Mapping) else cfg.get(section)
    if isinstance(part, Mapping) and key in part:
        return part[key]
    if isinstance(cfg, Mapping) and key in cfg:
        return cfg[key]
    return default


class Evaluator:
    """Samples and scores candidate calibrations (see the module docstring).

    Args:
        bundle: model, text encoder (factory) and decoder (``search.models``).
        rewards: a scorer with ``score(images [B,H,W,3], prompts) -> [B]`` (``search.rewards.build_rewards``).
        steps, sampler, scheduler: ComfyUI sampling settings.
        width, height: image size; the latent is [C, height/8, width/8] (``latent_shape`` overrides it).
        guidance: distilled guidance passed with the conditioning (FLUX); None for none.
        cfg: the CFG scale of the family's ordinary sampling; only used by :meth:`identity`, since a candidate's
            members and ω carry the guidance exactly.
        negative_prompt: text seen by members whose prompt is ``negative``.
        batch_size: ``"auto"`` or the number of forward rows per pack.
        max_memory: cap on peak memory (bytes or ``"20GB"``): CUDA allocated memory, or CPU process RSS.
        cache_dir: folder of cached prompt encodings.
        rescale: Qwen-Image's norm rescale of the combined prediction (default: the family table's ``rescale``).
        schedule: ``"workflow"`` (the family's ComfyUI sampling node at this image size) or ``"model"`` (the
            model's own model_sampling); see ``search.schedule``.
    """

    def __init__(self, bundle: ModelBundle, rewards: Any, *, steps: int = 15, sampler: str = "euler",
                 scheduler: str = "simple", width: int = 512, height: int = 512, latent_shape: Optional[tuple] = None,
                 guidance: Optional[float] = None, cfg: Optional[float] = None, negative_prompt: str = "",
                 batch_size: Any = "auto", max_memory: Any = None, cache_dir: Any = None,
                 rescale: Optional[bool] = None, device: Any = None, schedule: str = "workflow"):
        self.bundle = bundle
        self.family_info, self.layout = model_layout(bundle.model)
        if self.family_info.audio_video:  # before any sampling: one latent would leave the audio sites without effect
            raise ValueError(f"Calibri: the search samples one image/video latent, but {self.family_info.title} "
                             "denoises video and audio together (a nested latent), which the evaluator does not "
                             "build yet: its audio sites would have no effect. Calibrate it with the nodes "
                             "(CalibriManual / CalibriApply) instead.")
        self.schedule = SamplingSchedule(bundle.model, self.family_info, schedule, width, height)
        self.model = self.schedule.model
        self.family = self.family_info.name
        self.rewards = rewards
        self.steps, self.sampler_name, self.scheduler = int(steps), sampler, scheduler
        self.guidance = guidance if guidance is not None else self.family_info.guidance
        self.cfg = float(cfg) if cfg is not None else self.family_info.default_cfg
        self.negative_prompt = negative_prompt
        self.rescale = self.family_info.rescale if rescale is None else bool(rescale)
        if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
            raise ValueError(f"Calibri: batch_size must be 'auto' or a positive integer; got {batch_size!r}.")
        self.batch_size = batch_size
        self.max_memory = parse_bytes(max_memory)
        self.device = torch.device(device) if device not in (None, "auto") else self.model.load_device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_info = {"name": bundle.name, "sha256": bundle.sha256, "family": self.family, **bundle.files,
                           "schedule": self.schedule.record(self.scheduler, self.steps)}
        latent_format = self.model.get_model_object("latent_format")
        if latent_shape is None:
            down = int(getattr(latent_format, "spacial_downscale_ratio", 8))
            if width % down or height % down:
                raise ValueError(f"Calibri: width and height must be multiples of {down}; got {width}×{height}.")
            spatial = (height // down, width // down)
            depth = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
            latent_shape = (latent_format.latent_channels,) + depth + spatial
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) == 4 and self.latent_shape[1] != 1:
            raise ValueError(f"Calibri: latent_shape {list(self.latent_shape)} has {self.latent_shape[1]} frames, but "
                             "the search scores one image per sample with image rewards; use a one-frame latent "
                             f"(e.g. {[self.latent_shape[0], 1, *self.latent_shape[2:]]}).")
        self.patched = apply_row_scales(self.model, _row_source)
        self.pad_text = self.family_info.text_padding and _host_passes_attention_mask(self.model)
        self.patch_size = token_patch(self.model)
        self._encoder: Any = None
        self._decoder: Any = None
        self._encodings: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._per_row: Optional[float] = None
        self.encoder_calls = 0
        self.peak_bytes = 0
        self.last_scores: Optional[torch.Tensor] = None
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ construction from a run config

    @classmethod
    def from_config(cls, config: Any, bundle: Optional[ModelBundle] = None) -> "Evaluator":
        """Build from a ``search.config.RunConfig`` (or the same sections as nested dicts).

        Reads [model] checkpoint / diffusion_model / text_encoders / vae, [model.options] dtype, clip_type,
        max_memory, batch_size, device, cache_dir, rescale; [sampling] steps, sampler, scheduler, schedule, width,
        height, cfg, guidance, negative_prompt; [[rewards]]; [output] run_dir (prompt cache in ``run_dir/prompt_cache``
        unless ``cache_dir`` is given). ``bundle`` replaces the files (tests, benchmarks).
        """
        from .rewards import build_rewards

        options = dict(_get(config, "model", "options", {}) or {})
        cache_dir = options.get("cache_dir")
        run_dir = _get(config, "output", "run_dir")
        if cache_dir is None and run_dir:
            cache_dir = os.path.join(run_dir, "prompt_cache")
        if bundle is None:
            bundle = load_bundle(model=_get(config, "model", "diffusion_model") or None,
                                 checkpoint=_get(config, "model", "checkpoint") or None,
                                 text_encoders=_get(config, "model", "text_encoders", []) or [],
                                 vae=_get(config, "model", "vae") or None, clip_type=options.get("clip_type"),
                                 dtype=options.get("dtype"), cache_dir=Path(cache_dir) if cache_dir else None)
            name = _get(config, "model", "name")
            if name:
                bundle.name = name
        rewards = _get(config, "rewards", "rewards", None)
        if rewards is None:
            rewards = getattr(config, "rewards", None) if not isinstance(config, Mapping) else config.get("rewards")
        if rewards is None:
            from .config import default_rewards

            rewards = default_rewards()
        scorer = build_rewards(rewards)
        return cls(bundle, scorer, steps=_get(config, "sampling", "steps", 15),
                   sampler=_get(config, "sampling", "sampler", "euler"),
                   scheduler=_get(config, "sampling", "scheduler", "simple"),
                   width=_get(config, "sampling", "width", 512), height=_get(config, "sampling", "height", 512),
                   latent_shape=options.get("latent_shape"), guidance=_get(config, "sampling", "guidance"),
                   cfg=_get(config, "sampling", "cfg"),
                   negative_prompt=_get(config, "sampling", "negative_prompt", ""),
                   batch_size=options.get("batch_size", "auto"), max_memory=options.get("max_memory"),
                   cache_dir=cache_dir, rescale=options.get("rescale"), device=options.get("device"),
                   schedule=_get(config, "sampling", "schedule", "workflow"))

    # ------------------------------------------------------------------ calibrations

    def identity(self, granularity: str = "block") -> Calibration:
        """Ordinary sampling as a calibration: all scales 1; ω = 1 (one member), or (cfg, 1 − cfg) on (positive,
        negative) for CFG families, which equals ordinary CFG sampling at the sampling cfg. The search starts from
        its config's members instead (ω from ``search.cfg_start``: 7 for Qwen-Image, whose sampling cfg is 4)."""
        sites = self.layout.site_names(granularity)
        ones = (1.0,) * len(sites)
        if self.family_info.cfg is not None:
            members = (Member(ones, self.cfg, "positive"), Member(ones, 1.0 - self.cfg, "negative"))
        else:
            members = (Member(ones),)
        return Calibration(self.family, granularity, sites, members)

    # ------------------------------------------------------------------ prompts

    def _cache_file(self, identity: str, prompt: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{identity}\n{prompt}".encode("utf-8")).hexdigest()
        return self.cache_dir / f"{key}.safetensors"

    def _encoder_identity(self) -> str:
        encoder = self.bundle.encoder
        identity = getattr(encoder, "identity", None)
        if identity is None:
            encoder = self._encoder_object()
            identity = encoder.identity
        return identity

    def _encoder_object(self) -> Any:
        if self._encoder is None:
            self._encoder = self.bundle.make_encoder()
        return self._encoder

    def prepare(self, prompts: Sequence[str], free: bool = True) -> None:
        """Encode every prompt not yet encoded (disk cache first), then free the text encoder.

        Call it once with all training and validation prompts; :meth:`evaluate` encodes missing prompts itself
        (reloading the encoder if it was freed).
        """
        from safetensors.torch import load_file, save_file

        wanted = [p for p in dict.fromkeys(list(prompts) + [self.negative_prompt]) if p not in self._encodings]
        if not wanted:
            return
        started = time.perf_counter()
        identity = self._encoder_identity()
        todo = []
        for prompt in wanted:
            path = self._cache_file(identity, prompt)
            if path is not None and path.is_file():
                tensors = load_file(str(path))
                cond = tensors.pop("cond")
                extras = {k[len("extra."):]: v for k, v in tensors.items()}
                extras.update(dict.fromkeys(_none_extras(path)))
                self._encodings[prompt] = (cond, extras)
            else:
                todo.append(prompt)
        if todo:
            encoder = self._encoder_object()
            for prompt in todo:
                cond, extras = encoder.encode(prompt)
                self.encoder_calls += 1
                cond = cond.detach().cpu().contiguous()
                extras = {k: None if v is None else v.detach().cpu().contiguous() for k, v in extras.items()}
                self._encodings[prompt] = (cond, extras)
                path = self._cache_file(identity, prompt)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tensors = {f"extra.{k}": v for k, v in extras.items() if v is not None}
                    none = json.dumps(sorted(k for k, v in extras.items() if v is None))
                    save_file({"cond": cond, **tensors}, str(tmp),
                              metadata={"prompt": prompt, "encoder": identity, "none_extras": none})
                    os.replace(tmp, path)
            if free:
                self.free_encoder()
        self.stats["encode_s"] = self.stats.get("encode_s", 0.0) + time.perf_counter() - started

    def free_encoder(self) -> None:
        if self._encoder is not None:
            free_encoder(self._encoder)
            self._encoder = None

    # ------------------------------------------------------------------ memory

    def _estimate_per_row(self) -> float:
        """Bytes per forward row: ComfyUI's own estimate (what calc_cond_batch uses to split batches)."""
        return float(self.model.model.memory_required([1, *self.latent_shape]))

    def _budget(self) -> float:
        """Bytes available for activations now (max_memory or free memory, minus what is resident)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            allocated = torch.cuda.memory_allocated(self.device)
            pending = max(0, self.model.model_size() - self.model.loaded_size())  # weights not loaded yet
            budget = free - pending
            if self.max_memory is not None:
                budget = min(budget, self.max_memory - allocated - pending)
            return budget
        import psutil

        rss = psutil.Process().memory_info().rss
        available = psutil.virtual_memory().available
        return (self.max_memory - rss) if self.max_memory is not None else 0.8 * available

    def max_rows(self) -> int:
        """Forward rows per pack: ``batch_size``, or what fits the memory budget (on CPU at most ``CPU_ROWS``)."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        per_row = self._per_row if self._per_row is not None else self._estimate_per_row()
        rows = max(1, int(0.9 * self._budget() // max(per_row, 1.0)))
        return min(rows, CPU_ROWS) if self.device.type == "cpu" else rows

    # ------------------------------------------------------------------ evaluation

    def _terms(self, candidate: Calibration) -> tuple[list[Term], Optional[int]]:
        terms = plan_terms(candidate, self.layout, active=True)
        reference = rescale_reference(candidate, self.layout, True, terms) if self.rescale else None
        return terms, reference

    def _signature(self, cond: torch.Tensor, extras: dict) -> tuple:
        """Passes with equal signatures share a forward: equal shapes, or (text padding) equal but for the length."""
        def shape(name: str, value: Any) -> Any:
            if value is None:
                return None
            return "mask" if self.pad_text and name == "attention_mask" else tuple(value.shape)

        text = tuple(cond.shape[2:]) if self.pad_text else tuple(cond.shape)
        return text, tuple(sorted((n, shape(n, v)) for n, v in extras.items()))

    def _conditioning(self, texts: list[str]) -> tuple[torch.Tensor, dict]:
        """The batched conditioning of ``texts``; texts of other lengths zero-padded and masked (``pad_text``)."""
        conds = [self._encodings[t][0] for t in texts]
        extras = [self._encodings[t][1] for t in texts]
        options = {name: None if value is None else torch.cat([e[name] for e in extras])
                   for name, value in extras[0].items()}
        length = max(c.shape[1] for c in conds)
        if any(c.shape[1] != length for c in conds):
            masks = [torch.nn.functional.pad(_token_mask(c, e.get("attention_mask")), (0, length - c.shape[1]))
                     for c, e in zip(conds, extras)]
            conds = [torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])) for c in conds]
            options["attention_mask"] = torch.cat(masks)
        return torch.cat(conds), options

    def _groups(self, pack: list[tuple[int, int]], plans: list, prompts: Sequence[str]) -> list[_Group]:
        by_shape: dict[tuple, list] = {}
        for j, (k, p) in enumerate(pack):
            terms, reference = plans[k]
            for i, term in enumerate(terms):
                text = prompts[p] if term.prompt == "positive" else self.negative_prompt
                signature = self._signature(*self._encodings[text])
                by_shape.setdefault(signature, []).append((j, text, term, i == reference))
        self.stats["forwards_per_step"] = max(self.stats.get("forwards_per_step", 0), len(by_shape))
        groups = []
        for index, passes in enumerate(by_shape.values()):
            cond, options = self._conditioning([text for _, text, _, _ in passes])
            if self.guidance is not None:
                options["guidance"] = float(self.guidance)
            conditioning = [[cond, options]]
            groups.append(_Group(
                key=f"calibri{index}", pairs=torch.tensor([j for j, *_ in passes], dtype=torch.long),
                rows=torch.tensor([term.row for _, _, term, _ in passes], dtype=torch.float32),
                weights=torch.tensor([term.weight for _, _, term, _ in passes], dtype=torch.float64),
                reference=torch.tensor([r for *_, r in passes]), conditioning=conditioning))
        return groups

    def noise_for(self, prompts: Sequence[str], seed: int) -> torch.Tensor:
        """Initial noise [P, ...]: each prompt's own generator, seeded from (seed, prompt).

        Keyed by the prompt rather than its position, a prompt gets the same noise at a seed whatever bucket it is
        drawn in and in whatever order (common random numbers across buckets); no global RNG is touched.
        """
        def prompt_seed(prompt: str) -> int:
            return int.from_bytes(hashlib.sha256(f"{int(seed)}\n{prompt}".encode("utf-8")).digest()[:8], "little")

        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(prompt_seed(p)))
                            for p in prompts])

    def _sample(self, pack: list[tuple[int, int]], plans: list, prompts: Sequence[str], noise: torch.Tensor,
                seed: int) -> torch.Tensor:
        import comfy.samplers

        groups = self._groups(pack, plans, prompts)
        guider = _PackGuider.make(self.patched, groups, self.patch_size if self.rescale else None)
        pair_noise = noise[torch.tensor([p for _, p in pack])]
        sigmas = self.schedule.sigmas(self.scheduler, self.steps)
        sampler = comfy.samplers.sampler_object(self.sampler_name)
        with torch.no_grad():
            return guider.sample(pair_noise, torch.zeros_like(pair_noise), sampler, sigmas, seed=seed,
                                 disable_pbar=True)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._decoder is None:
            self._decoder = self.bundle.make_decoder()
        with torch.no_grad():
            return self._decoder.decode(latents).float().cpu()

    def _run(self, candidates: Sequence[Calibration], prompts: Sequence[str], seed: int):
        """Sample every (candidate, prompt) pair in packs; yield (candidate index, its P images) as they complete."""
        if not prompts:
            raise ValueError("Calibri: evaluate needs at least one prompt.")
        self.prepare(prompts)
        plans = [self._terms(c) for c in candidates]
        noise = self.noise_for(prompts, seed)
        pairs = [(k, p) for k in range(len(candidates)) for p in range(len(prompts))]
        pending: dict[int, dict[int, torch.Tensor]] = {}
        start = 0
        while start < len(pairs):
            limit = self.max_rows()
            pack, rows = [], 0
            while start + len(pack) < len(pairs):
                k, p = pairs[start + len(pack)]
                need = len(plans[k][0])
                if pack and rows + need > limit:
                    break
                pack.append((k, p))
                rows += need
            start += len(pack)
            t0 = time.perf_counter()
            base = _PeakMeter.current(self.device)
            with _PeakMeter(self.device) as meter:
                latents = self._sample(pack, plans, prompts, noise, seed)
            self.stats["sample_s"] = self.stats.get("sample_s", 0.0) + time.perf_counter() - t0
            self.stats["forward_rows"] = max(self.stats.get("forward_rows", 0), rows)
            self.peak_bytes = max(self.peak_bytes, meter.peak)
            if self.batch_size == "auto" and meter.peak > base:
                # Measured bytes per row, with the weights (loaded during the first pack) counted as resident.
                resident = _PeakMeter.current(self.device)
                self._per_row = max((meter.peak - max(base, resident)) / rows, 1.0) * 1.1
            t0 = time.perf_counter()
            images = self._decode(latents)
            self.stats["decode_s"] = self.stats.get("decode_s", 0.0) + time.perf_counter() - t0
            for (k, p), image in zip(pack, images):
                pending.setdefault(k, {})[p] = image
                if len(pending[k]) == len(prompts):
                    done = pending.pop(k)
                    yield k, torch.stack([done[i] for i in range(len(prompts))])

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Reward per image; NaN where the image is not finite (a candidate that blew up) or the reward fails."""
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        scores = torch.full((images.shape[0],), float("nan"))
        if bool(finite.any()):
            t0 = time.perf_counter()
            try:
                good = self.rewards.score(torch.nan_to_num(images).clamp(0, 1), list(prompts))
                scores = torch.where(finite, good.float(), scores)
            except ValueError as e:
                log.warning("Calibri: reward failed on a candidate's images (%s); its fitness is NaN.", e)
            self.stats["reward_s"] = self.stats.get("reward_s", 0.0) + time.perf_counter() - t0
        return scores

    def evaluate(self, candidates: Sequence[Calibration], prompts: Sequence[str], seed: int) -> torch.Tensor:
        """Mean reward of each candidate over ``prompts``, all sampled with noise from ``seed``.

        Returns:
            float32 [len(candidates)]; NaN for a candidate whose images are not finite. Per-prompt scores are
            kept in ``last_scores`` [K, P].
        """
        scores = torch.full((len(candidates), len(prompts)), float("nan"))
        for k, images in self._run(candidates, prompts, seed):
            scores[k] = self._score(images, prompts)
        self.last_scores = scores
        return scores.mean(dim=1)

    def images(self, calibration: Calibration, prompts: Sequence[str], seed: int) -> torch.Tensor:
        """The images [P, H, W, 3] in [0, 1] one calibration makes for ``prompts`` (same noise as evaluate)."""
        return next(iter(self.images_many([calibration], prompts, seed)))

    def images_many(self, calibrations: Sequence[Calibration], prompts: Sequence[str], seed: int) -> list:
        """Images of several calibrations, sampled packed like :meth:`evaluate`; one [P, H, W, 3] per calibration."""
        out: list = [None] * len(calibrations)
        for k, images in self._run(calibrations, prompts, seed):
            out[k] = images
        return out

