"""``python -m search`` / ``calibri-search``: run, check or resume a Calibri search from a TOML run config.

The ComfyUI host is found as ``python -m calibri_core.comfy_env serve|test`` find it (``COMFYUI_PATH``, the ComfyUI
that contains this pack, the pinned snapshot) but never provisioned here, and activated (``comfy_env.activate``:
first on ``sys.path``, ``args.cpu`` without CUDA) after the config is validated and before anything imports ComfyUI.

A refusal (a bad config, a damaged or pickled run state, a run dir in use, a file the config names that is missing:
any ``ValueError`` or ``FileNotFoundError`` whose message starts with ``Calibri:``) is one line on stderr,
``calibri-search: error: Calibri: ...`` naming the file, the problem and the fix, and exit code 2 (``--log-level
DEBUG`` adds its traceback); any other failure (a bug) shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Sequence

from .config import EVALUATOR_DEFAULT, ConfigError, RunConfig, load_config, parse_override, schema_help

logger = logging.getLogger("calibri")

# Shortcut flags: (flag, config key, type, help).
_SHORTCUTS = (
    ("--generations", "search.generations", int, "cap on CMA-ES generations (default: pycma's own stop criteria)"),
    ("--budget-hours", "search.budget_hours", float, "stop after this many hours (0 = no limit)"),
    ("--seed", "search.seed", int, "base seed"),
    ("--popsize", "search.popsize", int, "candidates per generation (0 = 4 + 3 ln n)"),
    ("--sigma0", "search.sigma0", float, "initial CMA-ES step size"),
    ("--granularity", "search.granularity", str, "block | layer | gate"),
    ("--bucket-size", "search.bucket_size", int, "training prompts per generation"),
    ("--val-every", "search.val_every", int, "validate every K generations"),
    ("--evaluator", "search.evaluator", str, "'comfy' or 'python:module:factory'"),
    ("--run-dir", "output.run_dir", str, "run dir (state, logs, plots, presets)"),
    ("--preset", "output.preset", str, "extra copy of the best preset (.safetensors)"),
)

_SMOKE_HELP = ("smoke tests and benchmarks: [model] options = { clip_type = \"hash\" } loads only the diffusion model: "
               "prompts become seeded noise (search.models.HashTextEncoder) and, without model.vae, latents are "
               "decoded by ComfyUI's latent-preview colours (LatentRGBDecoder). No text-encoder or VAE weights are "
               "needed, and the images mean nothing: use it to check a set-up or time a run, never to calibrate.")


def find_host(config: RunConfig):
    """The ComfyUI host (``calibri_core.comfy_env.find_host`` without provisioning), or None for a
    ``python:`` evaluator when there is none. The ComfyUI evaluator cannot run without one, and a ``COMFYUI_PATH``
    that is not a ComfyUI is an error for every evaluator: ConfigError."""
    from calibri_core import comfy_env

    try:
        return comfy_env.find_host(provision=False)
    except comfy_env.ComfyHostError as e:
        if config.search["evaluator"] == EVALUATOR_DEFAULT:
            raise ConfigError(f"{e} The search samples with ComfyUI's own code (search.evaluator = 'comfy'), so it "
                              f"needs that host; `python -m calibri_core.comfy_env where` shows which one is "
                              f"used.") from None
        if os.environ.get("COMFYUI_PATH"):
            raise ConfigError(str(e)) from None
        logger.warning("Calibri: no ComfyUI host (%s); running the evaluator %s without one.", e,
                       config.search["evaluator"])
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibri-search",
        description="Search Calibri gate scales (and ensemble weights ω) for a DiT model with CMA-ES, scoring images "
                    "with reward models, as in the reference protocol (arXiv 2603.24800). The run config is a TOML "
                    "file; options below override it. Launch with torchrun --standalone --nproc_per_node=K to shard "
                    "candidates over K processes.",
        epilog=schema_help() + "\n\n" + _SMOKE_HELP + "\n\nSee search/example_config.toml.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run config (TOML). With --resume it is optional and must match the "
                                         "run's stored config.json.")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last generation; "
                                                           "the final presets equal those of an uninterrupted run")
    for flag, key, kind, text in _SHORTCUTS:
        parser.add_argument(flag, type=kind, dest=key, metavar=kind.__name__.upper(), help=f"{text} (= {key})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key; VALUE is read as TOML (e.g. --set sampling.steps=20 "
                             "--set 'search.scale_bounds=[0, 2]'); repeatable")
    parser.add_argument("--check", action="store_true", help="validate the config (files, rewards, prompts, run dir; "
                                                             "with --resume also the run state: state.json, "
                                                             "config.json, optimizer.jsonl) and exit without "
                                                             "loading a model")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default INFO)")
    return parser


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """One refusal: the message (it names the file, the problem and the fix) on stderr, exit code 2 (as
    ``parser.error``, without the usage lines: the arguments were fine)."""
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    raise SystemExit(2)


def _activate(parser: argparse.ArgumentParser, host) -> None:
    """Put the host first on sys.path before anything imports comfy (comfy.model_management reads args.cpu)."""
    from calibri_core import comfy_env

    try:
        comfy_env.activate(host)
    except comfy_env.ComfyHostError as e:
        _refuse(parser, str(e))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(message)s")
    if not args.config and not args.resume:
        parser.error("give --config FILE (a new run) or --resume RUN_DIR.")
    overrides = {}
    for _, key, _, _ in _SHORTCUTS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.resume and "output.run_dir" in overrides:
        parser.error("--resume RUN_DIR already names the run dir; drop --run-dir / output.run_dir.")
    try:
        for text in args.set:
            key, value = parse_override(text)
            overrides[key] = value
        config = load_config(args.config, overrides, resume=args.resume)
        host = find_host(config)
        if host is not None:
            _activate(parser, host)
        if args.check:  # no weights loaded: the model file is judged by its header
            from .loop import check_before_loading, check_run_dir

            saved = check_run_dir(config, resume=bool(args.resume))
            check_before_loading(config)  # the ComfyUI evaluator has a host here: find_host refused otherwise
    except ConfigError as e:
        _refuse(parser, str(e))
    if args.check:
        state = (f"run state OK: generation {saved.state.generation}{', finished' if saved.state.finished else ''}"
                 f"\n" if saved is not None else "")
        sys.stdout.write(f"config OK: {config.model['family']} {config.search['granularity']}, "
                         f"{len(config.members)} member(s), {len(config.train_prompts)} train / "
                         f"{len(config.val_prompts)} validation prompts, run dir {config.run_dir}\n{state}"
                         f"host: {host.report() if host else 'none'}\n")
        return 0
    if host is not None:
        logger.info("Calibri: %s", host.report())
    from .loop import run_search

    try:
        result = run_search(config, resume=bool(args.resume), progress=not args.no_progress)
    except ConfigError as e:
        _refuse(parser, str(e))
    except (FileNotFoundError, ValueError) as e:
        # Calibri's own refusals while the model and rewards are set up (a reward's weights not configured or not
        # there, a target file missing, a model file of another family); anything else is a bug: a traceback.
        if not str(e).startswith("Calibri: "):
            raise
        logger.debug("Calibri: the refusal's traceback:", exc_info=True)
        _refuse(parser, f"{e} (run config {args.config or os.path.join(args.resume, 'config.json')!r}; "
                        f"--log-level DEBUG shows where it was raised)")
    if result is not None:
        if result.nothing_to_do:
            sys.stdout.write(f"run already finished at generation {result.generations} (stopped by "
                             f"{result.stopped_by}); nothing to do; outputs left as they are\n")
        sys.stdout.write(f"best preset: {result.best_preset} ({config.output['final']}; best validation "
                         f"{result.best_val}, baseline {result.baseline_val})\nlast mean:   {result.mean_preset}\n")
    return 0
