"""Run configuration of the search: a TOML file, command-line overrides, and validation before any model loads.

Every key, its default and its meaning is in :data:`SCHEMA`; ``calibri-search --help`` prints that table. The
defaults are the reference protocol (``reference/calibri-reference.md``, "Search protocol"; issue 9), read from one
table: :data:`PROTOCOL` holds the protocol-wide values with their sources in the authors' repository
(v-gen-ai/Calibri), :data:`FAMILY_DEFAULTS` names the family-table fields (``calibri_core.families``: ``cfg``,
``guidance``, ``search_cfg``, ``search_granularity``, ``search_population``, ``search_micro_batch``) that hold the
per-family ones. Each deliberate deviation from the reference is a named option (``output.final``, ``[[rewards]]``
hpsv3 ``jpeg_quality``, ``search.generations``, ``search.fixed_noise``, ``sampling.schedule``). The reference samples
with diffusers' resolution-dependent shift; the search samples on the same shift through ComfyUI's own
``ModelSamplingFlux`` node at the image size (``search.schedule``), and for families the reference never ran, on the
schedule of the family's ComfyUI workflow template.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import tomllib

from calibri_core.calibration import PROMPTS
from calibri_core.families import FAMILIES, get_family
from calibri_core.files import write_bytes_atomic
from calibri_core.sites import GRANULARITIES

from .schedule import SCHEDULES

# Keys that may differ on --resume: how long to run and where, not what is searched.
RESUMABLE_CHANGES = ("search.generations", "search.budget_hours", "output.run_dir", "output.overwrite")
EVALUATOR_DEFAULT = "comfy"

_MISSING = object()
REFERENCE_REPO = "v-gen-ai/Calibri"

# The reference protocol's protocol-wide values: config key -> (value, source in the authors' repository).
PROTOCOL: dict[str, tuple[Any, str]] = {
    "search.seed": (42, "configs/ seed 42; src/optim/cmaes.py: generation g (from 1) samples with seed + g - 1"),
    "search.sigma0": (0.25, "src/optim/cmaes.py"),
    "search.popsize": (0, "src/optim/cmaes.py: pycma's default 4 + floor(3 ln n)"),
    "search.scale_bounds": ([-1.0, 2.0], "src/optim/cmaes.py"),
    "search.weight_bounds": ([-10.0, 10.0], "src/optim/cmaes.py"),
    "search.bucket_size": (16, "configs/"),
    "search.generations": (None, "src/optim/cmaes.py: no generation limit, pycma's own stop criteria"),
    "search.val_every": (10, "configs/"),
    "search.val_seed": (1234, "configs/"),
    "search.granularity": ("block", "ours: the reference has no pipeline for the other families"),
    "sampling.steps": (15, "configs/"),
    "sampling.width": (512, "configs/"),
    "sampling.height": (512, "configs/"),
    "sampling.schedule": ("workflow", "src/models/*_sg.py: diffusers pipelines with their schedulers' resolution-"
                          "dependent (dynamic) shift (FLUX.1, Qwen-Image), as ComfyUI's ModelSamplingFlux at the image "
                          "size sets it; other families: their ComfyUI template's sampling node"),
    "sampling.micro_batch": (4, "configs/ (a memory knob; not an option here, see model.options batch_size)"),
    "output.final": ("best-train", "src/optim/cmaes.py: the best training candidate is the solution"),
    "rewards.name": ("hpsv3", "configs/ cmaes_hpsv3_*; src/metrics/rewards.py"),
    "rewards.hpsv3.jpeg_quality": (95, "src/metrics/rewards.py: the remote reward client sends JPEG, quality 95"),
}
# The per-family values: config key -> (Family attribute, source); a None attribute falls back to PROTOCOL.
FAMILY_DEFAULTS: dict[str, tuple[str, str]] = {
    "search.granularity": ("search_granularity", "README quick start configs/cmaes_hpsv3_flux_layer; "
                                                 "src/models/*_sg.py (SD3.5, Qwen-Image: gates only)"),
    "search.popsize": ("search_population", "configs/ (Qwen-Image config)"),
    "search.cfg_start": ("search_cfg", "src/models/*_sg.py: cfg_scale = 7.0, never overridden in training"),
    "sampling.cfg": ("cfg", "configs/ (SD3.5 cfg 7, Qwen-Image guidance_scale 4); the other families: their ComfyUI "
                            "workflow template, named in the family table"),
    "sampling.guidance": ("guidance", "configs/ (FLUX guidance 3.5); FLUX.2, LongCat: FluxGuidance of their ComfyUI "
                                      "template"),
    "sampling.micro_batch": ("search_micro_batch", "configs/ (Qwen-Image config)"),
}
FINALS = ("best-train", "best-validation")
REMOVED = {"sampling.micro_batch": "the forward batch is [model.options] batch_size ('auto' = what fits the memory "
                                   "budget; an int = rows per forward). The reference's micro-batch ({ref}) is a "
                                   "memory knob that does not change its results; delete the key."}


def reference_default(key: str, family: Any = None) -> Any:
    """The reference's default for config ``key``: the family table's value where it has one, else :data:`PROTOCOL`."""
    if family is not None and key in FAMILY_DEFAULTS:
        value = getattr(family, FAMILY_DEFAULTS[key][0])
        if value is not None:
            return copy.deepcopy(value)
    if key not in PROTOCOL:
        return None
    return copy.deepcopy(PROTOCOL[key][0])


def _ref(key: str) -> Any:
    return reference_default(key)


def _src(key: str) -> str:
    source = PROTOCOL[key][1]
    return f"[{source}]" if source.startswith("ours") else f"[{REFERENCE_REPO} {source}]"


def _family_src(key: str) -> str:
    attr, where = FAMILY_DEFAULTS[key]
    values = ", ".join(f"{getattr(f, attr)!r} for {f.name}" for f in FAMILIES.values() if getattr(f, attr) is not None)
    return f"{values} [{REFERENCE_REPO} {where}]"


_CFG_CASE = " and ".join(f.name for f in FAMILIES.values() if f.cfg is not None)
# (section, key) -> (default, type(s), help). A default of None means "none / derived", see the help.
SCHEMA: dict[str, dict[str, tuple[Any, tuple[type, ...], str]]] = {
    "model": {
        "family": (_MISSING, (str,), "calibri_core family id (flux, sd3, qwen_image, ...); required"),
        "name": ("", (str,), "label written to the preset's provenance (default: the model file's name)"),
        "checkpoint": ("", (str,), "all-in-one checkpoint file (instead of diffusion_model/text_encoders/vae)"),
        "diffusion_model": ("", (str,), "diffusion model file (UNet/DiT weights)"),
        "text_encoders": ([], (list,), "text encoder files, in the order the model's CLIP loader takes them"),
        "vae": ("", (str,), "VAE file"),
        "options": ({}, (dict,), "free-form table passed through to the evaluator (dtype, clip type, ...)"),
    },
    "search": {
        "granularity": (None, (str,), "block | layer | gate (paper §3.2); default "
                        f"{_family_src('search.granularity')}, else {_ref('search.granularity')!r} "
                        f"{_src('search.granularity')}"),
        "seed": (_ref("search.seed"), (int,), "base seed: CMA-ES RNG, bucket permutation; generation g (from 1) "
                 f"samples with seed + g - 1 {_src('search.seed')}"),
        "fixed_noise": (False, (bool,), "sample every generation with the base seed instead of seed + g - 1 (the same "
                        "noise all run long: for planted-target checks and demos; the reference varies it)"),
        "popsize": (None, (int,), "candidates per generation; 0 = pycma's default 4 + 3 ln n; default "
                    f"{_family_src('search.popsize')}, else 0 {_src('search.popsize')}"),
        "cfg_start": (None, (float, int), "cfg case only: ω starts at (c, 1 - c); default "
                      f"{_family_src('search.cfg_start')} (not sampling.cfg), else sampling.cfg"),
        "sigma0": (_ref("search.sigma0"), (float, int), f"initial CMA-ES step size {_src('search.sigma0')}"),
        "scale_bounds": (_ref("search.scale_bounds"), (list,),
                         f"[low, high] for every scale {_src('search.scale_bounds')}"),
        "weight_bounds": (_ref("search.weight_bounds"), (list,),
                          f"[low, high] for every output weight ω {_src('search.weight_bounds')}"),
        "bucket_size": (_ref("search.bucket_size"), (int,), "training prompts per generation (one bucket of a seeded "
                        f"permutation) {_src('search.bucket_size')}"),
        "generations": (_ref("search.generations"), (int,), "cap on CMA-ES generations; none = run until pycma's "
                        f"own stop criteria {_src('search.generations')} (which also apply under a cap; the "
                        "reference's FLUX block run converged in ~200)"),
        "budget_hours": (0.0, (float, int), "stop after this many hours of wall time (0 = no limit)"),
        "val_every": (_ref("search.val_every"), (int,), "validate every K generations (and after the last one) "
                      f"{_src('search.val_every')}"),
        "val_seed": (_ref("search.val_seed"), (int,), f"fixed sampling seed of validation {_src('search.val_seed')}"),
        "candidates_per_call": (4, (int,), "candidates packed into one evaluator call (× bucket prompts rows); "
                                "chunks of this size are dealt to ranks, so results do not depend on the number of "
                                "processes; 0 = a rank's whole share in one call (fastest, but the last bits then "
                                "depend on the number of processes)"),
        "evaluator": (EVALUATOR_DEFAULT, (str,), "'comfy' (search.evaluator.Evaluator) or 'python:module:factory', "
                      "a callable factory(config) returning an object with layout, evaluate(), images()"),
    },
    "sampling": {
        "sampler": ("euler", (str,), "ComfyUI sampler name"),
        "scheduler": ("simple", (str,), "ComfyUI scheduler name"),
        "schedule": (_ref("sampling.schedule"), (str,), "'workflow': sample on the schedule a ComfyUI workflow of the "
                     "family uses at this image size, set by that ComfyUI node (FLUX.1 and Qwen-Image: "
                     "ModelSamplingFlux with their diffusers dynamic shift; FLUX.2: Flux2Scheduler; Chroma, "
                     "Lumina2, Z-Image, Ovis: ModelSamplingAuraFlow; Wan: ModelSamplingSD3; others: the model's own); "
                     "'model': the model's own model_sampling (no node). Recorded in the preset's provenance "
                     f"{_src('sampling.schedule')}"),
        "steps": (_ref("sampling.steps"), (int,), f"sampling steps {_src('sampling.steps')}"),
        "cfg": (None, (float, int), f"CFG scale; default {_family_src('sampling.cfg')}, else 1"),
        "guidance": (None, (float, int), f"distilled guidance (FLUX); default {_family_src('sampling.guidance')}, "
                     "else none"),
        "width": (_ref("sampling.width"), (int,), f"image width {_src('sampling.width')}"),
        "height": (_ref("sampling.height"), (int,), f"image height {_src('sampling.height')}"),
        "negative_prompt": ("", (str,), "text seen by members whose prompt is 'negative'"),
    },
    "prompts": {
        "train": ("default", (str,), "training prompt file, one prompt per line (blank and '#' lines skipped); "
                  "'default' = search/data/train_prompts.txt"),
        "validation": ("default", (str,), "held-out validation prompt file, same format; 'default' = "
                       "search/data/val_prompts.txt"),
    },
    "output": {
        "run_dir": (_MISSING, (str,), "folder for state, logs, plots, grids and presets"),
        "final": (_ref("output.final"), (str,), "which candidate is calibri-best.safetensors: 'best-train' (the best "
                  "training fitness) or 'best-validation' (the best validation score among validated best-training "
                  f"candidates); both are written as calibri-<final>.safetensors {_src('output.final')}"),
        "preset": ("", (str,), "extra copy of calibri-best.safetensors (.safetensors); default: only in run_dir"),
        "overwrite": (False, (bool,), "allow output.preset to replace an existing file"),
        "grid_prompts": (8, (int,), "validation prompts shown in the baseline-vs-best image grid (0 = none)"),
        "plots": (True, (bool,), "write PNG plots at each validation and at the end"),
    },
}
LIST_SECTIONS = {
    "members": "[[members]] prompt = 'positive'|'negative', weight = ω (optional). Default: one positive member "
               f"(ω 1); two (positive, negative) with ω = (search.cfg_start, 1 - search.cfg_start) for {_CFG_CASE}",
    "rewards": "[[rewards]] name = registry name or 'python:module:callable', weight = 1.0, other keys = options. "
               f"Default: {_ref('rewards.name')} {_src('rewards.name')}. An hpsv3 reward's jpeg_quality defaults to "
               f"{_ref('rewards.hpsv3.jpeg_quality')}: every image is JPEG-encoded (PIL) at that quality before "
               f"scoring {_src('rewards.hpsv3.jpeg_quality')}; 0 = off (the raw images)",
}


def default_rewards() -> list[dict]:
    """The reward list of a config that gives none: the reference's HPSv3 with its JPEG round trip."""
    return [{"name": reference_default("rewards.name"), "weight": 1.0,
             "jpeg_quality": reference_default("rewards.hpsv3.jpeg_quality")}]


class ConfigError(ValueError):
    """A run configuration that cannot start; the message says what to change."""


def _near(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=3)
    return f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of a prompt file, without lines starting with '#' (``search.prompts`` reads them)."""
    from .prompts import read_prompts as _read

    return _read(path)


def _sha(values: list[str]) -> str:
    return hashlib.sha256("\n".join(values).encode("utf-8")).hexdigest()


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with ``value`` read as a TOML value (a bare word is a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"Calibri: --set expects section.key=value (e.g. search.popsize=12); got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"Calibri: --set {key.strip()}: the value is an integer of thousands of digits; no config "
                          f"value is that long.") from None
    except RecursionError:
        raise ConfigError(f"Calibri: --set {key.strip()}: the value is nested too deeply.") from None
    return key.strip(), value


@dataclass
class RunConfig:
    """A validated run configuration. Sections are plain dicts with every default filled in.

    ``train_prompts`` / ``val_prompts`` hold the prompt files' contents; paths are absolute.
    """

    model: dict
    search: dict
    sampling: dict
    prompts: dict
    output: dict
    members: list[dict]
    rewards: list[dict]
    train_prompts: list[str] = field(default_factory=list)
    val_prompts: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict:
        """The configuration as stored in ``RUN_DIR/config.json`` (prompt file contents as hashes)."""
        return {
            "model": copy.deepcopy(self.model), "search": copy.deepcopy(self.search),
            "sampling": copy.deepcopy(self.sampling), "prompts": copy.deepcopy(self.prompts),
            "output": copy.deepcopy(self.output), "members": copy.deepcopy(self.members),
            "rewards": copy.deepcopy(self.rewards),
            "prompt_hashes": {"train": _sha(self.train_prompts), "validation": _sha(self.val_prompts)},
        }

    @property
    def run_dir(self) -> str:
        return self.output["run_dir"]


def _check_type(where: str, value: Any, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"Calibri: config key {where} must be a {names}; got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf literals
        raise ConfigError(f"Calibri: config key {where} must be a finite number; got {value!r}.")


def _fill(raw: dict) -> dict:
    """Check section and key names and types; fill defaults. Relative paths are left for :func:`_resolve`."""
    unknown = [k for k in raw if k not in SCHEMA and k not in LIST_SECTIONS]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"Calibri: unknown config section [{k}].{_near(k, [*SCHEMA, *LIST_SECTIONS])} Sections: "
                          f"{', '.join([*SCHEMA, *LIST_SECTIONS])}.")
    out: dict = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"Calibri: [{section}] must be a table; got {given!r}.")
        for k in given:
            if f"{section}.{k}" in REMOVED:
                raise ConfigError(_removed(f"{section}.{k}", raw.get("model", {}).get("family")))
            if k not in keys:
                raise ConfigError(f"Calibri: unknown config key {section}.{k}.{_near(k, keys)} Keys of [{section}]: "
                                  f"{', '.join(keys)}.")
        out[section] = {}
        for k, (default, types, _) in keys.items():
            if k in given and given[k] is None and default is None:  # "none / derived", as config.json stores it
                out[section][k] = None
            elif k in given:
                _check_type(f"{section}.{k}", given[k], types)
                out[section][k] = copy.deepcopy(given[k])
            elif default is _MISSING:
                raise ConfigError(f"Calibri: config key {section}.{k} is required ({keys[k][2]}).")
            else:
                out[section][k] = copy.deepcopy(default)
    for section in LIST_SECTIONS:
        value = raw.get(section)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, dict) for v in value)):
            raise ConfigError(f"Calibri: {section} must be a list of tables ({LIST_SECTIONS[section]}); got {value!r}.")
        out[section] = copy.deepcopy(value) if value is not None else None
    return out


def _removed(key: str, family_name: Any) -> str:
    family = FAMILIES.get(family_name) if isinstance(family_name, str) else None
    ref = reference_default(key, family)
    return f"Calibri: config key {key} is not an option: {REMOVED[key].format(ref=ref)}"


def _resolve_path(path: str, base: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _check_bounds(where: str, value: list) -> None:
    if (len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in value) or not value[0] < value[1]):
        raise ConfigError(f"Calibri: {where} must be [low, high], finite numbers with low < high; got {value!r}.")


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".calibri-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"Calibri: run dir {folder!r} is not writable ({e.strerror or e}). Choose another "
                          f"output.run_dir (--run-dir) or fix its permissions.") from None


def validate(data: dict, base_dir: str, check_files: bool = True) -> RunConfig:
    """Turn a raw config table into a :class:`RunConfig`, or raise :class:`ConfigError`. Loads no model.

    Args:
        data: the parsed TOML (with overrides applied).
        base_dir: relative paths are taken relative to this folder (the config file's).
        check_files: check that model and prompt files exist and that the run dir is writable.
    """
    cfg = _fill(data)
    m, s, smp, p, o = cfg["model"], cfg["search"], cfg["sampling"], cfg["prompts"], cfg["output"]

    # Family and granularity: the family table decides (every family here has all three granularities).
    if m["family"] not in FAMILIES:
        raise ConfigError(f"Calibri: unknown model family {m['family']!r}.{_near(m['family'], FAMILIES)} "
                          f"Supported: {', '.join(FAMILIES)}.")
    family = get_family(m["family"])
    for key in ("search.granularity", "search.popsize", "search.cfg_start"):
        section, name = key.split(".")
        if cfg[section][name] is None:
            cfg[section][name] = reference_default(key, family)
    supported = tuple(getattr(family, "granularities", GRANULARITIES))
    if s["granularity"] not in supported:
        raise ConfigError(f"Calibri: granularity {s['granularity']!r} is not supported by the {family.name} family "
                          f"({family.title}); it supports {', '.join(supported)}.")

    # Numbers.
    for key, low in (("bucket_size", 1), ("generations", 0), ("val_every", 1), ("popsize", 0),
                     ("candidates_per_call", 0)):
        if s[key] is not None and s[key] < low:
            raise ConfigError(f"Calibri: search.{key} must be at least {low}; got {s[key]}.")
    for key in ("seed", "val_seed"):  # pycma's and NumPy's RandomState take 32-bit seeds
        if not 0 <= s[key] < 2**32:
            raise ConfigError(f"Calibri: search.{key} must be in 0 .. 2**32 - 1; got {s[key]}.")
    if s["popsize"] == 1:
        raise ConfigError("Calibri: search.popsize must be at least 2 (CMA-ES needs to rank candidates), or 0 for "
                          "the default 4 + 3 ln n.")
    if not (math.isfinite(s["sigma0"]) and s["sigma0"] > 0):
        raise ConfigError(f"Calibri: search.sigma0 must be a positive number; got {s['sigma0']}.")
    if not (s["budget_hours"] >= 0 and math.isfinite(s["budget_hours"])):
        raise ConfigError(f"Calibri: search.budget_hours must be >= 0 (0 = no limit); got {s['budget_hours']}.")
    _check_bounds("search.scale_bounds", s["scale_bounds"])
    _check_bounds("search.weight_bounds", s["weight_bounds"])
    s["scale_bounds"] = [float(v) for v in s["scale_bounds"]]
    s["weight_bounds"] = [float(v) for v in s["weight_bounds"]]
    s["sigma0"] = float(s["sigma0"])
    s["budget_hours"] = float(s["budget_hours"])
    for key in ("steps", "width", "height"):
        if smp[key] < 1:
            raise ConfigError(f"Calibri: sampling.{key} must be at least 1; got {smp[key]}.")
    if smp["cfg"] is None:
        smp["cfg"] = family.default_cfg
    if smp["guidance"] is None:
        smp["guidance"] = reference_default("sampling.guidance", family)
    if s["cfg_start"] is not None:
        s["cfg_start"] = float(s["cfg_start"])
    if smp["schedule"] not in SCHEDULES:
        raise ConfigError(f"Calibri: sampling.schedule must be one of {', '.join(repr(v) for v in SCHEDULES)}; got "
                          f"{smp['schedule']!r}.{_near(smp['schedule'], SCHEDULES)}")
    if o["final"] not in FINALS:
        raise ConfigError(f"Calibri: output.final must be one of {', '.join(repr(f) for f in FINALS)}; got "
                          f"{o['final']!r}.{_near(o['final'], FINALS)}")
    smp["cfg"] = float(smp["cfg"])
    if smp["guidance"] is not None:
        smp["guidance"] = float(smp["guidance"])
    if o["grid_prompts"] < 0:
        raise ConfigError(f"Calibri: output.grid_prompts must be >= 0; got {o['grid_prompts']}.")

    # Members: prompt per member, ω defaulting to the reference's start point.
    members = cfg["members"]
    if members is None:
        members = ([{"prompt": "positive"}, {"prompt": "negative"}] if family.cfg is not None
                   else [{"prompt": "positive"}])
    if not members:
        raise ConfigError("Calibri: members is empty; give at least one [[members]] table (prompt = 'positive').")
    for i, mem in enumerate(members):
        extra = set(mem) - {"prompt", "weight"}
        if extra:
            raise ConfigError(f"Calibri: members[{i}] has unknown keys {sorted(extra)}; a member has prompt and "
                              f"weight.")
        if mem.get("prompt") not in PROMPTS:
            raise ConfigError(f"Calibri: members[{i}].prompt must be one of {PROMPTS}; got {mem.get('prompt')!r}.")
        if "weight" in mem:
            _check_type(f"members[{i}].weight", mem["weight"], (float, int))
    prompts = [mem["prompt"] for mem in members]
    weights = [mem.get("weight") for mem in members]
    if any(w is None for w in weights):
        if any(w is not None for w in weights):
            raise ConfigError("Calibri: give the weight (ω) of every member or of none.")
        if prompts == ["positive"]:
            weights = [1.0]
        elif prompts == ["positive", "negative"]:
            start = s["cfg_start"] if s["cfg_start"] is not None else smp["cfg"]  # families without a cfg case
            weights = [start, 1.0 - start]  # the reference's cfg case: (cfg_scale, 1 - cfg_scale)
        else:
            raise ConfigError(f"Calibri: members with prompts {prompts} have no default ω (defaults exist for "
                              f"['positive'] and ['positive', 'negative']); give each member a weight.")
    low, high = s["weight_bounds"]
    for i, w in enumerate(weights):
        if not low <= w <= high:
            raise ConfigError(f"Calibri: members[{i}] weight ω = {w} is outside search.weight_bounds {[low, high]}.")
    members = [{"prompt": pr, "weight": float(w)} for pr, w in zip(prompts, weights)]

    # Rewards, by the reward registry's names.
    rewards = cfg["rewards"] if cfg["rewards"] is not None else default_rewards()
    if not rewards:
        raise ConfigError("Calibri: rewards is empty; give at least one [[rewards]] table (name = 'hpsv3').")
    from .rewards import registered_rewards

    names = registered_rewards()
    for i, r in enumerate(rewards):
        name = r.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"Calibri: rewards[{i}] needs a name (one of {', '.join(names)}, or "
                              f"'python:module:callable'); got {r!r}.")
        if not name.startswith("python:") and name not in names:
            raise ConfigError(f"Calibri: unknown reward {name!r} in rewards[{i}].{_near(name, names)} Registered "
                              f"rewards: {', '.join(names)}; or 'python:module:callable' for your own.")
        w = r.setdefault("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"Calibri: rewards[{i}] ({name}) weight must be a finite number; got {w!r}.")
        r["weight"] = float(w)
        if name == "hpsv3":
            q = r.setdefault("jpeg_quality", reference_default("rewards.hpsv3.jpeg_quality"))
            if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 100:
                raise ConfigError(f"Calibri: rewards[{i}] (hpsv3) jpeg_quality must be an int 0..100 (0 = no JPEG "
                                  f"round trip); got {q!r}.")

    # Evaluator.
    ev = s["evaluator"]
    if ev != EVALUATOR_DEFAULT and not (ev.startswith("python:") and len(ev.split(":")) == 3 and all(ev.split(":"))):
        raise ConfigError(f"Calibri: search.evaluator must be 'comfy' or 'python:module:factory'; got {ev!r}.")

    # Paths.
    for key in ("checkpoint", "diffusion_model", "vae"):
        m[key] = _resolve_path(m[key], base_dir)
    for i, te in enumerate(m["text_encoders"]):
        if not isinstance(te, str) or not te:
            raise ConfigError(f"Calibri: model.text_encoders[{i}] must be a file path; got {te!r}.")
    m["text_encoders"] = [_resolve_path(te, base_dir) for te in m["text_encoders"]]
    from .prompts import DEFAULT_FILES

    for key, split in (("train", "train"), ("validation", "val")):
        p[key] = str(DEFAULT_FILES[split]) if p[key] == "default" else _resolve_path(p[key], base_dir)
    o["run_dir"] = _resolve_path(o["run_dir"], base_dir)
    o["preset"] = _resolve_path(o["preset"], base_dir)
    if not m["name"]:
        main_file = m["checkpoint"] or m["diffusion_model"]
        m["name"] = os.path.basename(main_file) if main_file else m["family"]
    if o["preset"] and not o["preset"].endswith(".safetensors"):
        raise ConfigError(f"Calibri: output.preset must end in .safetensors; got {o['preset']!r}.")

    config = RunConfig(m, s, smp, p, o, members, rewards, source=base_dir)
    if check_files:
        _check_files(config)
    return config


def _check_files(config: RunConfig) -> None:
    m = config.model
    if config.search["evaluator"] == EVALUATOR_DEFAULT and not (m["checkpoint"] or m["diffusion_model"]):
        raise ConfigError("Calibri: the config names no model: set model.checkpoint, or model.diffusion_model with "
                          "model.text_encoders and model.vae.")
    files = [("model.checkpoint", m["checkpoint"]), ("model.diffusion_model", m["diffusion_model"]),
             ("model.vae", m["vae"])] + [(f"model.text_encoders[{i}]", te) for i, te in enumerate(m["text_encoders"])]
    for where, path in files:
        if path and not os.path.isfile(path):
            raise ConfigError(f"Calibri: {where} file {path!r} does not exist. Check the path (relative paths are "
                              f"taken from the config file's folder).")
    for key, attr in (("train", "train_prompts"), ("validation", "val_prompts")):
        path = config.prompts[key]
        if not os.path.isfile(path):
            raise ConfigError(f"Calibri: prompts.{key} file {path!r} does not exist.")
        try:
            values = read_prompts(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"Calibri: prompts.{key}: {str(e).removeprefix('Calibri: ')}") from None
        setattr(config, attr, values)
    _check_writable(config.run_dir)
    preset = config.output["preset"]
    if preset:
        folder = os.path.dirname(preset)
        if not os.path.isdir(folder):
            raise ConfigError(f"Calibri: output.preset folder {folder!r} does not exist; create it first.")


def check_reward_files(config: RunConfig) -> None:
    """What building each reward would refuse after the model has loaded (weights not configured or not there, no
    server URL, a python: reward that does not import), refused without loading any weights: by ``--check`` and by a
    run before its model loads. A ``python:`` evaluator scores by its own means and is not checked."""
    from .rewards import check_rewards

    if config.search["evaluator"] != EVALUATOR_DEFAULT:
        return
    for i, entry in enumerate(config.rewards):
        try:
            check_rewards([entry])
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"Calibri: rewards[{i}] ({entry['name']}): {str(e).removeprefix('Calibri: ')}") \
                from None


def _set_key(data: dict, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SCHEMA:
        raise ConfigError(f"Calibri: unknown config section in override {key!r}.{_near(section, SCHEMA)}")
    if key in REMOVED:
        raise ConfigError(_removed(key, data.get("model", {}).get("family")))
    if name not in SCHEMA[section]:
        raise ConfigError(f"Calibri: unknown config key {key!r}.{_near(name, SCHEMA[section])} Keys of [{section}]: "
                          f"{', '.join(SCHEMA[section])}.")
    data.setdefault(section, {})[name] = value


def load_config(path: str | None, overrides: dict[str, Any] | None = None, resume: str | None = None,
                raw: dict | None = None) -> RunConfig:
    """Read, override and validate a run configuration; with ``resume``, check it against the stored one.

    Args:
        path: the TOML file; may be None with ``resume`` (the stored config is used) or with ``raw``.
        overrides: ``{"section.key": value}`` applied on top of the file.
        resume: a run dir to continue; its ``config.json`` must match (except :data:`RESUMABLE_CHANGES`).
        raw: a config table instead of a file (tests, ``run_search``); relative paths from the cwd.
    """
    stored = None
    if resume is not None:
        stored_path = os.path.join(resume, "config.json")
        if not os.path.isfile(stored_path):
            raise ConfigError(f"Calibri: --resume {resume!r}: no config.json there, so it is not a Calibri run dir "
                              f"(or the run never started). Start a new run with --config.")
        stored = _read_stored(stored_path)
    if raw is not None:
        data, base = copy.deepcopy(raw), os.getcwd()
    elif path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"Calibri: config file {path!r} does not exist.")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Calibri: config file {path!r} is not valid TOML: {e}.") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"Calibri: config file {path!r} is not UTF-8 text (byte {e.start}); TOML files are "
                              f"UTF-8: save it as UTF-8.") from None
        except ValueError:  # an integer of more digits than Python converts (4300)
            raise ConfigError(f"Calibri: config file {path!r} holds an integer of thousands of digits; no config "
                              f"value is that long.") from None
        except RecursionError:
            raise ConfigError(f"Calibri: config file {path!r} is nested too deeply to be a run config.") from None
        except OSError as e:
            raise ConfigError(f"Calibri: config file {path!r} cannot be read ({e.strerror or e}).") from None
        base = os.path.dirname(os.path.abspath(path))
    elif stored is not None:
        data = {k: v for k, v in stored.items() if k != "prompt_hashes"}
        base = os.getcwd()
    else:
        raise ConfigError("Calibri: give a run config (--config FILE) or a run dir to resume (--resume RUN_DIR).")
    for key, value in (overrides or {}).items():
        _set_key(data, key, value)
    if resume is not None:
        if not isinstance(data.get("output", {}), dict):
            raise ConfigError(f"Calibri: [output] must be a table; got {data['output']!r}.")
        data.setdefault("output", {})["run_dir"] = os.path.abspath(resume)
    try:
        config = validate(data, base)
    except ConfigError as e:
        if path is None and raw is None:  # the values came from the run dir's config.json: name it
            raise ConfigError(f"Calibri: {stored_path!r} does not hold a valid run config ("
                              f"{str(e).removeprefix('Calibri: ')}); it was damaged or edited: restore the file, "
                              f"or start a new run dir (--config, another output.run_dir).") from None
        raise
    if stored is not None:
        _compare_with_stored(config.to_dict(), stored, resume)
    return config


def refuse_json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def load_json_file(path: str) -> tuple[Any, str | None]:
    """A run dir's JSON file: (its value, None), or (None, what is wrong with it: unreadable, not UTF-8, nested too
    deeply, not JSON). NaN and Infinity are not JSON here: Calibri never writes them."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"), parse_constant=refuse_json_constant), None
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text (byte {e.start})"
    except RecursionError:
        return None, "is nested too deeply"
    except ValueError as e:  # JSONDecodeError, a non-finite constant, an integer of too many digits
        return None, f"is not valid JSON ({e})"


def _read_stored(path: str) -> dict:
    """A run dir's config.json, or ConfigError naming it (damaged, edited, not a table)."""
    stored, problem = load_json_file(path)
    if problem is None:
        if isinstance(stored, dict) and all(isinstance(v, (dict, list)) for v in stored.values()):
            return stored
        problem = "is not a table of config sections"
    raise ConfigError(f"Calibri: the run's config {path!r} {problem}; it was damaged or edited, so the run cannot "
                      f"be checked against it: restore the file, or start a new run dir (--config, another "
                      f"output.run_dir).")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _compare_with_stored(current: dict, stored: dict, run_dir: str) -> None:
    a = {k: v for k, v in _flatten(json.loads(json.dumps(current))).items() if k not in RESUMABLE_CHANGES}
    b = {k: v for k, v in _flatten(stored).items() if k not in RESUMABLE_CHANGES}
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]
    if diffs:
        lines = [f"Calibri: --resume {run_dir!r}: the given config differs from the one this run was started with "
                 f"(stored in config.json), so continuing would not reproduce the run:"]
        for k in diffs[:10]:
            lines.append(f"  {k}: run has {b.get(k, '(absent)')!r}, given {a.get(k, '(absent)')!r}")
        if len(diffs) > 10:
            lines.append(f"  ... and {len(diffs) - 10} more")
        lines.append(f"  Only {', '.join(RESUMABLE_CHANGES)} may change. Resume without --config to use the stored "
                     f"config, or start a new run dir.")
        if not os.path.isfile(os.path.join(run_dir, "state.json")):
            lines.append(f"  This run never completed a generation (no state.json), so nothing is lost by starting "
                         f"over: delete {os.path.join(run_dir, 'config.json')!r} and run with --config instead.")
        raise ConfigError("\n".join(lines))


def schema_help() -> str:
    """The config reference printed by ``--help``."""
    lines = ["run config keys (TOML; [section] key = default: meaning):"]
    for section, keys in SCHEMA.items():
        lines.append(f"  [{section}]")
        for k, (default, _, text) in keys.items():
            shown = "(required)" if default is _MISSING else json.dumps(default)
            lines.append(f"    {k} = {shown}: {text}")
    for section, text in LIST_SECTIONS.items():
        lines.append(f"  {text}")
    for key in REMOVED:
        lines.append(f"  {key} (reference {PROTOCOL[key][0]}, {_family_src(key)}) is not an option: "
                     f"{REMOVED[key].format(ref='see above')}")
    return "\n".join(lines)


def write_json_atomic(path: str, obj: Any) -> None:
    """JSON to ``path`` via a temp file in the same folder, fsync, rename (never a half-written file)."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    write_bytes_atomic(path, data)
