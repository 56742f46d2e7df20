"""The search loop: CMA-ES over one flat vector per candidate, scored by an evaluator, checkpointed every generation.

Search vector (documented order): member 1's scales at the chosen granularity (sites in the model's order, i.e.
``layout.site_names(granularity)``), then member 2's scales, ..., then ω_1 ... ω_N. x0 = all scales 1 and ω from
the config (1 for a single member; (cfg, 1 − cfg) for the cfg case) and is the first candidate of generation 1.

Per generation g (1-based): one bucket of ``bucket_size`` training prompts from a seeded permutation; every
candidate is scored on that bucket with seed ``search.seed + g - 1`` (common random numbers; the reference's 42 + g −
1); rewards become losses in ``optimizer.reward_to_loss`` (NaN/inf → worst, counted and logged). The run stops when
pycma's own stop criteria say so (the reference), at the ``search.generations`` cap or at ``search.budget_hours``.
The pack size (forward rows per evaluator pack) is measured in generation 1 and recorded in the state; from then on
every rank uses it, also after a resume, so packs are composed the same way (GPU kernels are not batch-invariant).
Every ``val_every`` generations (and after the last) the identity baseline (once) and the best training candidate so
far are scored on the validation prompts with ``val_seed``. The best training candidate is written as
``calibri-best-train.safetensors`` (the reference's solution), the best by validation score as
``calibri-best-validation.safetensors``; ``output.final`` picks which one is also ``calibri-best.safetensors``
(summary.json records it), and the CMA-ES mean after the last generation is ``calibri-last-mean.safetensors``. After
every generation the state is written atomically (state.py). The run dir is locked by the process using it, and an
existing ``output.preset`` that this run did not write is replaced only with ``output.overwrite = true``.

Evaluator protocol (``search.evaluator.Evaluator`` or ``python:module:factory``): ``layout`` (SiteLayout),
``evaluate(candidates, prompts, seed) -> tensor[len(candidates)]`` (mean reward, higher is better), optional
``images(calibration, prompts, seed) -> [B,H,W,3]`` for grids and optional ``model_info`` (dict for the provenance,
e.g. the model hash). The loop calls ``evaluate`` with chunks of ``search.candidates_per_call`` candidates (default 4),
which the evaluator packs into large forward batches; chunks, not ranks, fix the batches, so results do not depend on
the number of processes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibri_core.calibration import Calibration, Member
from calibri_core.families import get_family

from . import distributed, outputs
from .config import EVALUATOR_DEFAULT, ConfigError, RunConfig, check_reward_files, load_config, write_json_atomic
from .model_files import check_family, check_model_files
from .optimizer import CMAOptimizer, ReplayMismatch, reward_to_loss
from .state import (
    LOCK_FILE,
    OPTIMIZER_LOG,
    STATE_FILE,
    BucketSampler,
    RunLock,
    RunState,
    RunStateError,
    SavedRun,
    append_exchange,
    holder_of,
    load_state,
    restore_rng,
    save_state,
    write_exchanges,
)

logger = logging.getLogger("calibri")


class SearchSpace:
    """The flat vector <-> ``Calibration`` map for one layout, granularity and member list."""

    def __init__(self, layout, granularity: str, members: list[dict], scale_bounds, weight_bounds):
        self.layout, self.granularity = layout, granularity
        self.sites = tuple(layout.site_names(granularity))
        self.prompts = tuple(m["prompt"] for m in members)
        self.n = len(members)
        k = len(self.sites)
        self.dimension = self.n * k + self.n
        self.x0 = np.array([1.0] * (self.n * k) + [float(m["weight"]) for m in members])
        self.lower = np.array([scale_bounds[0]] * (self.n * k) + [weight_bounds[0]] * self.n)
        self.upper = np.array([scale_bounds[1]] * (self.n * k) + [weight_bounds[1]] * self.n)

    def order(self) -> list[tuple[int, str]]:
        """(member, site name or "ω") for every entry of the vector."""
        return [(m, s) for m in range(self.n) for s in self.sites] + [(m, "ω") for m in range(self.n)]

    def to_calibration(self, x) -> Calibration:
        x = np.asarray(x, dtype=np.float64)
        k = len(self.sites)
        members = tuple(Member(tuple(x[i * k:(i + 1) * k].tolist()), float(x[self.n * k + i]), self.prompts[i])
                        for i in range(self.n))
        return Calibration(self.layout.family, self.granularity, self.sites, members)


@dataclass
class SearchResult:
    """What ``run_search`` returns on rank 0 (other ranks get ``None``)."""

    run_dir: str
    best_preset: str
    mean_preset: str
    best: Calibration
    best_val: float | None
    baseline_val: float | None
    generations: int
    history: list
    stopped_by: str | None = None  # "generations", "budget_hours", "pycma"; None: this call stopped, not the run
    nothing_to_do: bool = False  # a resume of a finished run whose outputs were already written


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs at the start of a new run.

    The evaluator should draw its noise from explicit seeds (common random numbers), but anything it or a library
    takes from the global generators is then reproducible too; their states are checkpointed with the run.
    """
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_evaluator(config: RunConfig) -> Any:
    """The evaluator named by ``search.evaluator``: the ComfyUI one or a ``python:module:factory`` hook."""
    spec = config.search["evaluator"]
    if spec == EVALUATOR_DEFAULT:
        from .evaluator import Evaluator

        factory = getattr(Evaluator, "from_config", Evaluator)
    else:
        _, module, attr = spec.split(":")
        try:
            factory = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"Calibri: cannot import module {module!r} for search.evaluator {spec!r}: {e}. Make "
                              f"sure it is on PYTHONPATH.") from e
        for piece in attr.split("."):
            if not hasattr(factory, piece):
                raise ConfigError(f"Calibri: module {module!r} has no attribute {attr!r} (search.evaluator).")
            factory = getattr(factory, piece)
    evaluator = factory(config)
    for needed in ("layout", "evaluate"):
        if not hasattr(evaluator, needed):
            raise TypeError(f"Calibri: the evaluator from {spec!r} has no {needed!r}; an evaluator provides layout, "
                            f"evaluate(candidates, prompts, seed) and optionally images() and model_info.")
    return evaluator


def check_run_dir(config: RunConfig, resume: bool, check_lock: bool = True) -> SavedRun | None:
    """Everything about the run dir that can be refused without a model (``--check`` and the start of a run): a
    new run over an existing one, a damaged or pickled run state (validated in full), a run dir in use, an
    ``output.preset`` that would be replaced without ``output.overwrite``. Returns the saved run to continue, if any.
    """
    run_dir = config.run_dir
    has_state = os.path.isfile(os.path.join(run_dir, STATE_FILE))
    has_config = os.path.isfile(os.path.join(run_dir, "config.json"))
    if not resume and has_config and not has_state:
        raise ConfigError(f"Calibri: run dir {run_dir!r} holds a run that was started but never completed a "
                          f"generation (config.json, no state.json: the process was killed while loading or in its "
                          f"first generation). Continue it with --resume {run_dir} (its stored config), or, to start "
                          f"over with this config, delete {os.path.join(run_dir, 'config.json')!r}: nothing else "
                          f"there records the run.")
    if not resume and (has_state or has_config):
        raise ConfigError(f"Calibri: run dir {run_dir!r} already holds a run. Continue it with --resume {run_dir}, "
                          f"or choose another output.run_dir (--run-dir).")
    holder = holder_of(run_dir) if check_lock else None
    if holder is not None:
        raise RunStateError(f"Calibri: run dir {run_dir!r} is in use by process {holder}; wait for it to finish or "
                            f"stop it, then resume.")
    saved = load_state(run_dir) if resume else None
    _check_preset_target(config, saved.state if saved else None)
    return saved


def check_before_loading(config: RunConfig) -> None:
    """What the ComfyUI evaluator would refuse once its model is loaded, refused from the files alone (``--check``
    and the start of a run): rewards whose local files are missing, a model file that contradicts the config. A
    ``python:`` evaluator loads what it likes and is not checked."""
    if config.search["evaluator"] == EVALUATOR_DEFAULT:
        check_reward_files(config)
        check_model_files(config)


def _file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_preset_target(config: RunConfig, state: RunState | None) -> None:
    """``output.preset`` may replace an existing file only with ``output.overwrite`` or when this run wrote it."""
    path = config.output["preset"]
    if not path or config.output["overwrite"] or not os.path.exists(path):
        return
    if state is not None and state.preset_sha256 and os.path.isfile(path) and _file_sha256(path) == \
            state.preset_sha256:
        return  # the copy this run wrote when it last finished
    raise ConfigError(f"Calibri: output.preset {path!r} already exists and output.overwrite is false, so the run "
                      f"would replace it: choose another output.preset, move the file away, or set "
                      f"output.overwrite = true (--set output.overwrite=true).")


def prepare_run_dir(config: RunConfig, resume: bool) -> SavedRun | None:
    """:func:`check_run_dir`, then store config.json for a new run. No model involved; the caller holds the lock."""
    run_dir = config.run_dir
    saved = check_run_dir(config, resume, check_lock=False)
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        write_json_atomic(os.path.join(run_dir, "config.json"), config.to_dict())
    return saved


def _coerce_config(config: Any) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return load_config(None, raw=config)
    return load_config(os.fspath(config))


def run_search(config: Any, evaluator: Any = None, resume: bool = False, progress: bool = False,
               max_generations: int | None = None) -> SearchResult | None:
    """Run (or continue) a search; the function behind ``python -m search``.

    Args:
        config: a :class:`RunConfig`, a TOML path or a raw config dict (validated before anything loads).
        evaluator: an object implementing the evaluator protocol; default: built from ``search.evaluator``.
        resume: continue the run in ``config.output.run_dir`` (must have been started with the same config).
        progress: show tqdm bars (generations, candidates).
        max_generations: stop this call after that many new generations (the run stays resumable; tests).

    Returns:
        a :class:`SearchResult` on rank 0, None on other ranks.
    """
    config = _coerce_config(config)
    ctx = distributed.init_from_env()
    lock, saved, start = None, None, None
    try:
        with distributed.step(ctx):  # a failure on any rank ends every rank, with its message
            if ctx.is_main:  # the run state is checked before any model is loaded
                start = _NewStart(config.run_dir) if not resume else None
                os.makedirs(config.run_dir, exist_ok=True)
                lock = RunLock(config.run_dir).acquire()
                saved = prepare_run_dir(config, resume)
                if evaluator is None:
                    check_before_loading(config)
            if evaluator is None:
                evaluator = build_evaluator(config)
            check_family(config, get_family(evaluator.layout.family))
            if hasattr(evaluator, "prepare"):
                # Encode every prompt of the run once (disk cache first) and free the text encoder.
                evaluator.prepare(list(config.train_prompts) + list(config.val_prompts))
        if not ctx.is_main:
            distributed.serve(evaluator, ctx, config.search["candidates_per_call"])
            return None
        with distributed.ShardedEvaluator(evaluator, ctx, config.search["candidates_per_call"]) as sharded:
            return _main_loop(config, sharded, progress, max_generations, saved)
    except BaseException:
        if start is not None:
            start.undo()
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown(ctx)


class _NewStart:
    """What a new run writes before its first generation is saved, taken back if the start fails, so that a
    corrected config starts in the same run dir (a failed start would otherwise leave config.json, which makes the
    dir "hold a run" that cannot be resumed with the corrected config). Once state.json exists the run is real and
    nothing is removed. The prompt cache stays: its entries are keyed by the text encoder's identity, so a later run
    with other files never reads them."""

    STARTED = ("config.json", outputs.LOG_FILE, OPTIMIZER_LOG, LOCK_FILE)

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.created_dir = not os.path.exists(run_dir)
        self.present = {name for name in self.STARTED if os.path.exists(os.path.join(run_dir, name))}

    def undo(self) -> None:
        if os.path.exists(os.path.join(self.run_dir, STATE_FILE)):
            return
        for name in self.STARTED:
            if name not in self.present:
                try:
                    os.remove(os.path.join(self.run_dir, name))
                except FileNotFoundError:
                    pass
        if self.created_dir:
            try:
                os.rmdir(self.run_dir)  # only when nothing else (a prompt cache) is left in it
            except OSError:
                pass


def _replay(config: RunConfig, space: SearchSpace, saved: SavedRun) -> CMAOptimizer:
    """The optimiser of a saved run, rebuilt from its exchange log (checked against this model's search space)."""
    s, run_dir = config.search, config.run_dir
    state = saved.state
    dims = {len(saved.exchanges[0]["candidates"][0])} if saved.exchanges else set()
    dims |= {len(b["x"]) for b in (state.best_train, state.best_val) if b is not None}
    if dims - {space.dimension}:
        raise RunStateError(f"Calibri: the run state in {run_dir!r} searched vectors of {sorted(dims)[0]} values, but "
                            f"this model and config give {space.dimension} ({len(space.sites)} sites × {space.n} "
                            f"member(s) + ω): it is not the model the run started with. Resume with that model, or "
                            f"start a new run dir.")
    try:
        return CMAOptimizer.replay(space.x0, s["sigma0"], space.lower, space.upper, s["popsize"] or None, s["seed"],
                                   saved.exchanges)
    except ReplayMismatch as e:
        import cma

        raise RunStateError(f"Calibri: {os.path.join(run_dir, OPTIMIZER_LOG)!r}: {e}; the log was edited, or this "
                            f"machine's pycma ({cma.__version__}) / NumPy ({np.__version__}) numerics differ from the "
                            f"run's, so the optimiser cannot be rebuilt exactly. Resume where the run started, or "
                            f"start a new run dir.") from None


def _apply_pack(ev: distributed.ShardedEvaluator, state: RunState) -> None:
    """Generation 1 measured the pack size: record it once, then every rank packs with it (see state.py)."""
    inner = ev.evaluator
    if not hasattr(inner, "batch_size"):
        return  # an evaluator hook without packing
    if state.pack is None:
        stats = getattr(inner, "stats", None) or {}
        rows = inner.batch_size if isinstance(inner.batch_size, int) else stats.get("forward_rows")
        if rows is None and hasattr(inner, "max_rows"):
            rows = inner.max_rows()  # this rank scored nothing in generation 1 (more ranks than chunks)
        if rows is None:
            return
        per_row = getattr(inner, "_per_row", None)
        state.pack = {"rows": int(rows), "per_row_bytes": float(per_row) if per_row is not None else None}
    ev.use_pack_rows(state.pack["rows"])


def _main_loop(config: RunConfig, ev: distributed.ShardedEvaluator, progress: bool,
               max_generations: int | None, saved: SavedRun | None = None) -> SearchResult:
    from tqdm import tqdm

    s, run_dir = config.search, config.run_dir
    space = SearchSpace(ev.layout, s["granularity"], config.members, s["scale_bounds"], s["weight_bounds"])
    if saved is not None:
        state = saved.state
        opt = _replay(config, space, saved)
        reason = _stop_reason(config, state, opt)
        if state.finished and reason is not None and _outputs_current(config, state):
            return _nothing_to_do(config, space, state, reason)
        write_exchanges(run_dir, saved.exchanges)  # drops a line a kill left beyond state.json
        restore_rng(state.rng)
        outputs.write_log(run_dir, state.history)
        if state.pack is not None:
            _apply_pack(ev, state)
        logger.info("Calibri: resuming %s at generation %d", run_dir, state.generation)
    else:
        state = RunState()
        seed_global_rngs(s["seed"])
        opt = CMAOptimizer(space.x0, s["sigma0"], space.lower, space.upper, s["popsize"] or None, s["seed"])
        outputs.write_log(run_dir, [])
        write_exchanges(run_dir, [])
    sampler = BucketSampler(len(config.train_prompts), s["bucket_size"], s["seed"], state.bucket_epoch,
                            state.bucket_offset)
    done_here = 0
    with _logs_above_bars(progress):
        bar = tqdm(total=s["generations"], initial=state.generation, desc="generations", unit="gen",
                   disable=not progress)
        cbar = tqdm(total=opt.popsize, desc="candidates", unit="cand", leave=False, disable=not progress)
        try:
            bar.set_postfix(_bar_postfix(config, state, opt))
            while (reason := _stop_reason(config, state, opt)) is None:
                if max_generations is not None and done_here >= max_generations:
                    break
                _generation(config, ev, space, opt, sampler, state, cbar)
                bar.update(1)
                bar.set_postfix(_bar_postfix(config, state, opt))
                done_here += 1
            if reason is not None and state.generation > 0 and state.last_validated != state.generation:
                t0 = time.time()
                _validate(config, ev, space, state)
                state.elapsed_s += time.time() - t0
                save_state(run_dir, state)
            if reason is not None and not state.finished:
                state.finished = True
                save_state(run_dir, state)
        finally:
            # The inner bar first: its close moves the cursor back up to the middle of the outer bar's row; the
            # outer bar's close then ends on a fresh row, where the next log line starts.
            cbar.close()
            bar.close()
    result = _finish(config, ev, space, opt, state, reason)
    if reason is None:
        logger.info("Calibri: this call stopped after %d new generation(s) (max_generations) at generation %d; the "
                    "run is not finished: continue it with --resume %s", done_here, state.generation, run_dir)
    else:
        logger.info("Calibri: stopped: %s. Best preset: %s", reason[1], result.best_preset)
    return result


class _AboveBars(logging.Handler):
    """Stands in for a console log handler while tqdm bars are drawn: each record goes to that handler with the
    bars cleared first and redrawn after (``tqdm.external_write_mode``, what ``tqdm.write`` does), so a log line
    never lands inside a bar. The handler keeps its own level, filters, format and stream;
    ``tqdm.contrib.logging.logging_redirect_tqdm`` replaces it by one that keeps only the format and stream, and
    gives loggers that had no handler one, which prints "calibri" records twice (there and at the root)."""

    def __init__(self, inner: logging.Handler):
        super().__init__(inner.level)
        self.inner = inner

    def handle(self, record: logging.LogRecord) -> bool:
        from tqdm import tqdm

        if record.levelno < self.inner.level:
            return False
        with tqdm.external_write_mode(file=getattr(self.inner, "stream", None) or sys.stderr):
            return bool(self.inner.handle(record))


def _on_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


@contextlib.contextmanager
def _logs_above_bars(enabled: bool):
    """While the bars are shown, the console handlers of the "calibri" logger and of the root logger (where
    ``logging.basicConfig`` puts its handler), and Python's last-resort handler (warnings when nothing is
    configured), write through :class:`_AboveBars`. Other handlers (files, pytest's capture) are left alone."""
    if not enabled:
        yield
        return
    swapped = []
    for lg in (logging.getLogger("calibri"), logging.getLogger()):
        swapped.append((lg, lg.handlers))
        lg.handlers = [_AboveBars(h) if _on_console(h) else h for h in lg.handlers]
    last_resort = logging.lastResort
    if last_resort is not None:
        logging.lastResort = _AboveBars(last_resort)
    try:
        yield
    finally:
        for lg, handlers in swapped:
            lg.handlers = handlers
        logging.lastResort = last_resort


def _stop_reason(config: RunConfig, state: RunState, opt: CMAOptimizer) -> tuple[str, str] | None:
    """Why the run stops at this generation: (``stopped_by``, a sentence for the log and summary.json), or None
    while it goes on. Checked once per generation, in this order: the ``search.generations`` cap, the
    ``search.budget_hours`` wall time, pycma's own stop criteria (only after a generation was told)."""
    from tqdm import tqdm

    s, g = config.search, state.generation
    cap, hours = s["generations"], s["budget_hours"]
    if cap is not None and g >= cap:
        return "generations", f"generations cap {cap} reached"
    if hours and state.elapsed_s >= hours * 3600.0:
        return "budget_hours", (f"budget of {hours:g} h reached after {g} generation(s) "
                                f"({tqdm.format_interval(state.elapsed_s)} of search time)")
    pycma = opt.stop_reasons() if g > 0 else {}
    if pycma:
        return "pycma", f"pycma's stop criteria met after {g} generation(s): " + ", ".join(
            f"{k}={v}" for k, v in sorted(pycma.items()))
    return None


def _budget_eta_s(config: RunConfig, state: RunState) -> float | None:
    """Seconds until ``search.budget_hours`` (or, sooner, the ``search.generations`` cap) ends the run, or None
    without a budget or before the first generation.

    The budget is checked after each generation, so the run ends with the first generation that ends past it:
    ceil(budget left / mean generation time) more generations (at most the cap's), each of the mean time of this
    run's generations so far (validations included, as the budget counts them). It is an estimate of the latest
    end, not a promise: pycma's stop criteria may end the run sooner, generations may speed up or slow down, and
    the final validation and outputs come after it.
    """
    s, g = config.search, state.generation
    if not s["budget_hours"] or g == 0:
        return None
    mean = state.elapsed_s / g
    if mean <= 0:
        return None
    left = max(0, math.ceil((s["budget_hours"] * 3600.0 - state.elapsed_s) / mean))
    if s["generations"] is not None:
        left = min(left, max(0, s["generations"] - g))
    return left * mean


def _bar_postfix(config: RunConfig, state: RunState, opt: CMAOptimizer) -> dict:
    """The generations bar's postfix. With a budget the bar has no total (or the cap's, which the budget may cut
    short), so tqdm's own ETA is missing or too long: ``eta`` is :func:`budget_eta_s`."""
    from tqdm import tqdm

    postfix = {"best": f"{state.best_train['fitness']:.4g}" if state.best_train else "-", "sigma": f"{opt.sigma:.3g}"}
    eta = _budget_eta_s(config, state)
    if eta is not None:
        postfix["eta"] = tqdm.format_interval(eta)
    return postfix


def _outputs_current(config: RunConfig, state: RunState) -> bool:
    """Whether the run dir holds the outputs of the state's generation: summary.json (written last) says that
    generation, the presets are there and so is the ``output.preset`` copy this run wrote. A run continued past a
    finish keeps ``state.finished``, so the generation is what tells stale outputs apart."""
    run_dir = config.run_dir
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("generations") != state.generation:
        return False
    names = (outputs.BEST_PRESET, outputs.MEAN_PRESET, *outputs.FINAL_PRESETS.values())
    if not all(os.path.isfile(os.path.join(run_dir, name)) for name in names):
        return False
    preset = config.output["preset"]
    return not preset or (os.path.isfile(preset) and _file_sha256(preset) == state.preset_sha256)


def _nothing_to_do(config: RunConfig, space: SearchSpace, state: RunState, reason: tuple[str, str]) -> SearchResult:
    """A resume of a finished run whose stop condition still holds: nothing is run or written (not even the logs),
    so the outputs keep their bytes and times. The result names the outputs the run wrote when it finished."""
    run_dir = config.run_dir
    if reason[0] == "pycma":
        hint = "pycma's stop criteria hold, so more generations would not continue it; start a new run to search on"
    else:
        hint = ("to search on, resume with a higher search.generations (--generations) or search.budget_hours "
                "(--budget-hours)")
    logger.info("Calibri: run already finished at generation %d (stopped: %s); nothing to do; outputs left as they "
                "are in %s (%s).", state.generation, reason[1], run_dir, hint)
    chosen = state.best_train if config.output["final"] == "best-train" else state.best_val
    best = space.to_calibration(chosen["x"] if chosen is not None else space.x0)
    return SearchResult(run_dir, os.path.join(run_dir, outputs.BEST_PRESET),
                        os.path.join(run_dir, outputs.MEAN_PRESET), best, state.best_val and state.best_val["score"],
                        state.baseline_val, state.generation, list(state.history), stopped_by=reason[0],
                        nothing_to_do=True)


def _generation(config: RunConfig, ev, space: SearchSpace, opt: CMAOptimizer, sampler: BucketSampler,
                state: RunState, cbar) -> None:
    s = config.search
    t0 = time.time()
    g = state.generation + 1
    xs = opt.ask()
    bucket = [config.train_prompts[i] for i in sampler.next()]
    seed = s["seed"] if s["fixed_noise"] else s["seed"] + g - 1
    candidates = [space.to_calibration(x) for x in xs]
    cbar.reset(total=len(candidates))
    t_eval = time.time()
    rewards = ev.evaluate_all(candidates, bucket, seed, on_done=lambda: cbar.update(1)).numpy()
    t_eval = time.time() - t_eval
    if state.pack is None:
        _apply_pack(ev, state)
    losses, nan_count = reward_to_loss(rewards)
    if nan_count:
        bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        logger.warning("Calibri: generation %d: %d candidate(s) had a non-finite reward (%s); ranked last.",
                       g, nan_count, bad)
    opt.tell(losses)
    finite = rewards[np.isfinite(rewards)]
    if finite.size:
        i = int(np.nanargmax(np.where(np.isfinite(rewards), rewards, -np.inf)))
        if state.best_train is None or rewards[i] > state.best_train["fitness"]:
            state.best_train = {"x": xs[i].tolist(), "fitness": float(rewards[i]), "generation": g}
    state.generation = g
    state.bucket_epoch, state.bucket_offset = sampler.epoch, sampler.offset
    record = {
        "generation": g, "seed": seed,
        "train_best": float(finite.max()) if finite.size else None,
        "train_mean": float(finite.mean()) if finite.size else None,
        "train_min": float(finite.min()) if finite.size else None,
        "train_std": float(finite.std()) if finite.size else None,
        "nan_count": nan_count, "popsize": len(candidates), "sigma": opt.sigma,
        "best_so_far": state.best_train["fitness"] if state.best_train else None,
        "eval_s": round(t_eval, 3),
    }
    if g % s["val_every"] == 0:
        t_val = time.time()
        record["val"] = _validate(config, ev, space, state)
        record["val_s"] = round(time.time() - t_val, 3)
    record["time_s"] = round(time.time() - t0, 3)
    state.elapsed_s += time.time() - t0
    record["elapsed_s"] = round(state.elapsed_s, 3)
    state.history.append(record)
    append_exchange(config.run_dir, g, opt.exchange())
    save_state(config.run_dir, state)
    outputs.append_log(config.run_dir, record)
    if "val" in record and config.output["plots"]:
        _plots(config, space, state)


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _validate(config: RunConfig, ev, space: SearchSpace, state: RunState) -> dict:
    """Score the identity baseline (once) and the best training candidate on the validation prompts."""
    s = config.search
    state.last_validated = state.generation
    if state.best_train is None:
        return {"generation": state.generation, "score": None}
    cached = next((v for v in reversed(state.validations) if v["candidate_generation"]
                   == state.best_train["generation"]), None)
    todo = []
    if state.baseline_val is None:
        todo.append(space.to_calibration(space.x0))
    if cached is None:
        todo.append(space.to_calibration(state.best_train["x"]))
    scores = ev.evaluate_all(todo, config.val_prompts, s["val_seed"]).tolist() if todo else []
    if state.baseline_val is None:
        state.baseline_val = _finite_or_none(scores.pop(0))
        if state.baseline_val is None:
            logger.warning("Calibri: the identity baseline's validation score is not finite.")
    score = cached["score"] if cached is not None else _finite_or_none(scores[0])
    record = {"generation": state.generation, "candidate_generation": state.best_train["generation"],
              "score": score, "baseline": state.baseline_val}
    state.validations.append(record)
    if score is not None and (state.best_val is None or score > state.best_val["score"]):
        state.best_val = {"x": list(state.best_train["x"]), "score": score,
                          "generation": state.best_train["generation"], "validated_at": state.generation}
    logger.info("Calibri: validation at generation %d: best candidate %s, baseline %s", state.generation, score,
                state.baseline_val)
    return record


def _plots(config: RunConfig, space: SearchSpace, state: RunState) -> None:
    run_dir, h = config.run_dir, state.history
    gens = [r["generation"] for r in h]
    nan = float("nan")
    outputs.line_plot(os.path.join(run_dir, "plot_train.png"), "training fitness (mean reward on the bucket)", {
        "best": (gens, [r["train_best"] if r["train_best"] is not None else nan for r in h]),
        "mean": (gens, [r["train_mean"] if r["train_mean"] is not None else nan for r in h]),
        "best so far": (gens, [r["best_so_far"] if r["best_so_far"] is not None else nan for r in h])})
    v = [r for r in state.validations if r.get("score") is not None]
    outputs.line_plot(os.path.join(run_dir, "plot_validation.png"), "validation score", {
        "best candidate": ([r["generation"] for r in v], [r["score"] for r in v]),
        "baseline": ([r["generation"] for r in v], [r["baseline"] if r["baseline"] is not None else nan for r in v])})
    outputs.line_plot(os.path.join(run_dir, "plot_sigma.png"), "CMA-ES sigma",
                      {"sigma": (gens, [r["sigma"] for r in h])}, log_y=True)
    best = state.best_val or state.best_train
    if best is not None:
        outputs.heatmap(os.path.join(run_dir, "plot_scales.png"), space.to_calibration(best["x"]),
                        tuple(config.search["scale_bounds"]))


def _finish(config: RunConfig, ev, space: SearchSpace, opt: CMAOptimizer, state: RunState,
            reason: tuple[str, str] | None = None) -> SearchResult:
    """Write the presets, plots, grid and summary.json. summary.json's ``stopped_by`` / ``stop_reason`` say what
    ended the run (see :func:`_stop_reason`; both None when only this call stopped); ``pycma_stop`` stays pycma's
    own criteria, also when the cap or the budget came first."""
    run_dir = config.run_dir
    best_path = os.path.join(run_dir, outputs.BEST_PRESET)
    mean_path = os.path.join(run_dir, outputs.MEAN_PRESET)
    model_info = dict(getattr(ev.evaluator, "model_info", None) or {})
    nan_total = sum(r["nan_count"] for r in state.history)
    stop = opt.stop_reasons() if state.generation else {}
    common = {"generations": state.generation, "popsize": opt.popsize, "dimension": space.dimension,
              "final_sigma": opt.sigma, "nan_rewards": nan_total, "baseline_val": state.baseline_val,
              "validations": [{k: r[k] for k in ("generation", "candidate_generation", "score")}
                              for r in state.validations if "candidate_generation" in r],
              "pycma_stop": sorted(stop)}
    identity = {"x": space.x0.tolist(), "generation": 0}
    finals: dict[str, tuple[dict, str, dict]] = {}
    if state.best_train is not None:
        chosen = state.best_train
        val = next((v["score"] for v in reversed(state.validations)
                    if v.get("candidate_generation") == chosen["generation"]), None)
        finals["best-train"] = (chosen, "best training fitness (the reference's solution)",
                                {**common, "candidate_generation": chosen["generation"],
                                 "train_fitness": chosen["fitness"], "val_score": val})
    else:
        finals["best-train"] = (identity, "identity (no candidate had a finite training reward)",
                                {**common, "candidate_generation": 0, "train_fitness": None, "val_score": None})
    if state.best_val is not None:
        chosen = state.best_val
        finals["best-validation"] = (
            chosen, "best validation score among validated best-training candidates",
            {**common, "candidate_generation": chosen["generation"], "val_score": chosen["score"],
             "train_fitness": next((r["fitness"] for r in [state.best_train] if r and r["x"] == chosen["x"]), None)})
    else:
        finals["best-validation"] = (identity, "identity (no candidate had a finite validation score)",
                                     {**common, "candidate_generation": 0, "val_score": None})
    counts = space.layout.counts
    final = config.output["final"]
    paths = {}
    for name, (chosen, selection, stats) in finals.items():
        prov = outputs.provenance(config, model_info, selection, {**stats, "final": name})
        paths[name] = os.path.join(run_dir, outputs.FINAL_PRESETS[name])
        outputs.write_preset(paths[name], space.to_calibration(chosen["x"]), counts, prov)
    chosen, selection, stats = finals[final]
    best = space.to_calibration(chosen["x"])
    prov = outputs.provenance(config, model_info, selection, {**stats, "final": final})
    outputs.write_preset(best_path, best, counts, prov)
    mean = space.to_calibration(opt.mean)
    outputs.write_preset(mean_path, mean, counts, outputs.provenance(
        config, model_info, "CMA-ES distribution mean after the last generation (not validated)", common))
    if config.output["preset"]:
        _check_preset_target(config, state)  # the file may have appeared while the run ran
        outputs.write_preset(config.output["preset"], best, counts, prov)
        state.preset_sha256 = _file_sha256(config.output["preset"])
        save_state(run_dir, state)
    if config.output["plots"] and state.history:
        _plots(config, space, state)
    _grid(config, ev, space, best, final)
    summary = {"generations": state.generation, "best_val": state.best_val and state.best_val["score"],
               "best_train": state.best_train and state.best_train["fitness"],
               "baseline_val": state.baseline_val, "calibri_best": final, "best_preset": best_path,
               "best_train_preset": paths["best-train"], "best_validation_preset": paths["best-validation"],
               "mean_preset": mean_path, "pycma_stop": stop, "stopped_by": reason and reason[0],
               "stop_reason": reason and reason[1]}
    write_json_atomic(os.path.join(run_dir, "summary.json"), json.loads(json.dumps(summary)))
    return SearchResult(run_dir, best_path, mean_path, best, state.best_val and state.best_val["score"],
                        state.baseline_val, state.generation, list(state.history), stopped_by=reason and reason[0])


def _grid(config: RunConfig, ev, space: SearchSpace, best: Calibration, final: str) -> None:
    n = min(config.output["grid_prompts"], len(config.val_prompts))
    images = getattr(ev.evaluator, "images", None)
    if not n or images is None:
        return
    prompts = config.val_prompts[:n]
    seed = config.search["val_seed"]
    try:
        rows = {"baseline (identity)": images(space.to_calibration(space.x0), prompts, seed),
                f"calibri-best ({final})": images(best, prompts, seed)}
        outputs.image_grid(os.path.join(config.run_dir, "grid_validation.png"), rows)
    except Exception as e:  # a grid is a convenience; the presets are already written
        logger.warning("Calibri: could not write the validation image grid: %s: %s", type(e).__name__, e)
