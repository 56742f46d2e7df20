"""Everything a run needs to continue exactly where it stopped, written atomically after every generation. No
file of a run dir is ever unpickled, and no pickle is written (issue 10).

``RUN_DIR/state.json`` holds the generation, the bucket permutation position, the Python / NumPy / torch RNG
states, the best candidates, validation records, the per-generation history and the pack size the evaluator used.
The optimiser is not stored as an object: ``RUN_DIR/optimizer.jsonl`` logs every generation's ask/tell exchange (the
candidates and their losses, as JSON numbers, which round-trip float64 exactly) and ``CMAOptimizer.replay`` rebuilds
pycma's state from it. Write order per generation: the exchange is appended (fsync), then state.json is replaced;
state.json's generation says how many log lines count, so a kill at any instant leaves a consistent run dir (a line
beyond it is dropped on resume). Everything read back is validated before use (:func:`load_state`), and a damaged
file is a :class:`RunStateError` naming the file, the problem and the fix.

``RUN_DIR/run.lock`` is held (``flock``) by the process that uses the run dir (:class:`RunLock`); the kernel releases
it when that process dies, so a lock file left by a killed run never blocks.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from calibri_core.files import write_bytes_atomic

from .config import ConfigError, load_json_file, refuse_json_constant, write_json_atomic

STATE_FILE = "state.json"
OPTIMIZER_LOG = "optimizer.jsonl"
LOCK_FILE = "run.lock"
# 2: the optimiser is replayed from optimizer.jsonl; 1 (before issue 10) pickled it into optimizer-GGGGGG.pkl.
STATE_VERSION = 2
_RESTART = "start a new run with --config and another output.run_dir (--run-dir)"


class RunStateError(ConfigError):
    """A run dir whose state cannot be continued (damaged, edited, from an older Calibri, or in use)."""


class BucketSampler:
    """Buckets of training prompts from a seeded permutation, reshuffled (seed, epoch) when it runs out.

    The position (``epoch``, ``offset``) is all the state there is, so a resumed run draws the same buckets.
    """

    def __init__(self, count: int, size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.count, self.size, self.seed = count, size, seed
        self.epoch, self.offset = epoch, offset

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def next(self) -> list[int]:
        """Indices of the next bucket; a bucket never straddles two permutations unless the file is shorter."""
        out: list[int] = []
        while len(out) < self.size:
            perm = self._permutation(self.epoch)
            take = perm[self.offset:self.offset + self.size - len(out)].tolist()
            out += take
            self.offset += len(take)
            if self.offset >= self.count:
                self.epoch, self.offset = self.epoch + 1, 0
        return out


def capture_rng() -> dict:
    """Python, NumPy (global) and torch (CPU and CUDA) RNG states as JSON."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


@dataclass
class RunState:
    """The loop's own state (the optimiser is kept beside it, see the module docstring).

    ``best_train``: the candidate with the highest training fitness so far ({"x", "fitness", "generation"}).
    ``best_val``: the validated candidate with the highest validation score ({"x", "score", "generation"}).
    ``baseline_val``: validation score of the identity calibration (computed once).
    ``validations``: one record per validation. ``history``: one record per generation (also the JSONL log).
    ``pack``: the evaluator's pack size, recorded after generation 1 and reused from then on, also on resume and by
    every rank ({"rows": forward rows per pack, "per_row_bytes": measured memory per row or None}); None for an
    evaluator without ``batch_size``. ``preset_sha256``: the digest of the ``output.preset`` copy this run wrote
    (so a resumed run may replace its own copy, never another file, without ``output.overwrite``).
    """

    generation: int = 0
    bucket_epoch: int = 0
    bucket_offset: int = 0
    best_train: dict | None = None
    best_val: dict | None = None
    baseline_val: float | None = None
    last_validated: int = 0
    validations: list = field(default_factory=list)
    history: list = field(default_factory=list)
    elapsed_s: float = 0.0
    finished: bool = False
    rng: dict = field(default_factory=dict)
    pack: dict | None = None
    preset_sha256: str | None = None


def save_state(run_dir: str, state: RunState) -> None:
    """Write state.json atomically (the generation's exchange must already be in the optimiser log)."""
    state.rng = capture_rng()
    write_json_atomic(os.path.join(run_dir, STATE_FILE), {"version": STATE_VERSION, **asdict(state)})


def append_exchange(run_dir: str, generation: int, exchange: dict) -> None:
    """Append generation ``generation``'s exchange to the optimiser log, durably, before state.json names it."""
    line = json.dumps({"generation": generation, **exchange}, allow_nan=False) + "\n"
    with open(os.path.join(run_dir, OPTIMIZER_LOG), "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_exchanges(run_dir: str, exchanges: list[dict]) -> None:
    """Rewrite the optimiser log with exactly ``exchanges`` (on resume: drops a line a kill left beyond state.json)."""
    data = "".join(json.dumps({"generation": g, **e}, allow_nan=False) + "\n" for g, e in enumerate(exchanges, 1))
    write_bytes_atomic(os.path.join(run_dir, OPTIMIZER_LOG), data.encode("utf-8"))


@dataclass
class SavedRun:
    """What :func:`load_state` read: the loop's state and the optimiser's exchanges, one per generation."""

    state: RunState
    exchanges: list[dict]


def refuse_pickles(run_dir: str) -> None:
    """An optimiser pickle from a Calibri before issue 10 is never loaded: refuse the run dir, naming it."""
    try:
        names = sorted(n for n in os.listdir(run_dir) if n.endswith(".pkl"))
    except OSError:
        return
    if names:
        raise RunStateError(
            f"Calibri: run dir {run_dir!r} holds the pickle {names[0]!r} (an optimiser checkpoint from an older "
            f"Calibri); a pickle can run code, so it is never loaded and this run cannot be resumed: {_RESTART} (its "
            f"presets, calibri-*.safetensors, stay usable).")


def read_json_file(path: str, what: str) -> Any:
    """Parse a run dir's JSON file, or raise :class:`RunStateError` naming it and what is wrong."""
    value, problem = load_json_file(path)
    if problem is None:
        return value
    raise RunStateError(f"Calibri: {what} {path!r} {problem}; it was damaged or edited, so the run cannot be "
                        f"continued from it: {_RESTART}.")


class _Bad(Exception):
    """A field of state.json that is not what this Calibri writes (the message names it)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _need(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        raise _Bad(f"{where} must be {expected}; got {shown[:60] + '...' if len(shown) > 60 else shown}")


def _vector(where: str, value: Any) -> None:
    _need(isinstance(value, list) and bool(value) and all(_is_number(v) for v in value), where,
          "a non-empty list of finite numbers", value)


def _optional_number(where: str, value: Any) -> None:
    _need(value is None or _is_number(value), where, "a finite number or null", value)


def _count(where: str, value: Any) -> None:
    _need(_is_int(value) and value >= 0, where, "an integer >= 0", value)


def _check_candidate(where: str, value: Any, score: str) -> None:
    if value is None:
        return
    _need(isinstance(value, dict), where, "an object or null", value)
    _vector(f"{where}.x", value.get("x"))
    _need(_is_number(value.get(score)), f"{where}.{score}", "a finite number", value.get(score))
    _count(f"{where}.generation", value.get("generation"))


def _check_rng(rng: Any) -> None:
    """Load every RNG state into a fresh generator (never the global ones): what restore_rng will accept."""
    _need(isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng), "rng",
          "an object with python, numpy and torch states", rng)
    try:
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as e:
        raise _Bad(f"rng.python is not a Python RNG state ({e})") from None
    try:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as e:
        raise _Bad(f"rng.numpy is not a NumPy RNG state ({e})") from None
    for key in ("torch",) + (("cuda",) if "cuda" in rng else ()):
        states = [rng[key]] if key == "torch" else rng[key]
        _need(isinstance(states, list) and all(isinstance(t, str) for t in states), f"rng.{key}",
              "base64 text", rng[key])
        try:
            raw = [base64.b64decode(t, validate=True) for t in states]
        except (binascii.Error, ValueError) as e:
            raise _Bad(f"rng.{key} is not base64 ({e})") from None
        if key == "torch":
            try:
                torch.Generator().set_state(torch.frombuffer(bytearray(raw[0]), dtype=torch.uint8))
            except (RuntimeError, ValueError) as e:
                raise _Bad(f"rng.torch is not a torch CPU RNG state ({e})") from None


def _check_state(payload: Any) -> RunState:
    """A :class:`RunState` from state.json's content, every field checked; raises :class:`_Bad`."""
    _need(isinstance(payload, dict), "the file", "a JSON object", payload)
    known = {f.name for f in fields(RunState)} | {"version"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise _Bad(f"it has unknown fields {unknown[:5]}")
    payload = {k: v for k, v in payload.items() if k != "version"}
    for key in ("generation", "bucket_epoch", "bucket_offset", "last_validated"):
        _count(key, payload.get(key, 0))
    _need(_is_number(payload.get("elapsed_s", 0.0)) and payload.get("elapsed_s", 0.0) >= 0, "elapsed_s",
          "a number >= 0", payload.get("elapsed_s"))
    _need(isinstance(payload.get("finished", False), bool), "finished", "true or false", payload.get("finished"))
    _check_candidate("best_train", payload.get("best_train"), "fitness")
    _check_candidate("best_val", payload.get("best_val"), "score")
    _optional_number("baseline_val", payload.get("baseline_val"))
    digest = payload.get("preset_sha256")
    _need(digest is None or (isinstance(digest, str) and len(digest) == 64), "preset_sha256", "null or a SHA-256",
          digest)
    generation = payload.get("generation", 0)
    history = payload.get("history", [])
    _need(isinstance(history, list) and len(history) == generation, "history",
          f"a list of {generation} generation records (one per generation)", history)
    for g, record in enumerate(history, start=1):
        where = f"history[{g - 1}]"
        _need(isinstance(record, dict), where, "an object", record)
        _need(record.get("generation") == g and _is_int(record.get("generation")), f"{where}.generation", str(g),
              record.get("generation"))
        _need(_is_int(record.get("popsize")) and record["popsize"] >= 2, f"{where}.popsize", "an integer >= 2",
              record.get("popsize"))
        _count(f"{where}.nan_count", record.get("nan_count"))
        _need(_is_number(record.get("sigma")), f"{where}.sigma", "a finite number", record.get("sigma"))
        for key in ("train_best", "train_mean", "train_min", "train_std", "best_so_far"):
            _optional_number(f"{where}.{key}", record.get(key))
    validations = payload.get("validations", [])
    _need(isinstance(validations, list), "validations", "a list", validations)
    for i, record in enumerate(validations):
        where = f"validations[{i}]"
        _need(isinstance(record, dict), where, "an object", record)
        _count(f"{where}.generation", record.get("generation"))
        _count(f"{where}.candidate_generation", record.get("candidate_generation"))
        for key in ("score", "baseline"):
            _need(key in record, f"{where}.{key}", "present (a number or null)", None)
            _optional_number(f"{where}.{key}", record[key])
    pack = payload.get("pack")
    if pack is not None:
        _need(isinstance(pack, dict) and _is_int(pack.get("rows")) and pack["rows"] >= 1, "pack",
              "null or an object with rows >= 1", pack)
        _optional_number("pack.per_row_bytes", pack.get("per_row_bytes"))
    _check_rng(payload.get("rng"))
    return RunState(**payload)


def _check_exchanges(path: str, state: RunState) -> list[dict]:
    """The first ``state.generation`` lines of the optimiser log, checked against state.json's history."""
    if state.generation == 0:
        return []
    if not os.path.isfile(path):
        raise RunStateError(f"Calibri: the optimiser log {path!r} is missing, but state.json is at generation "
                            f"{state.generation}; without it the optimiser cannot be rebuilt: {_RESTART}.")
    exchanges, dimension = [], None
    try:
        with open(path, "rb") as f:
            for g in range(1, state.generation + 1):
                line = f.readline()
                if not line.endswith(b"\n"):
                    raise _Bad(f"it ends after {g - 1} generations, but state.json is at generation "
                               f"{state.generation}")
                try:
                    record = json.loads(line.decode("utf-8"), parse_constant=refuse_json_constant)
                except (UnicodeDecodeError, ValueError, RecursionError) as e:
                    raise _Bad(f"line {g} is not valid JSON ({type(e).__name__})") from None
                _need(isinstance(record, dict) and record.get("generation") == g, f"line {g}",
                      f"the exchange of generation {g}", record)
                candidates, losses = record.get("candidates"), record.get("losses")
                popsize = state.history[g - 1]["popsize"]
                _need(isinstance(candidates, list) and len(candidates) == popsize, f"line {g} candidates",
                      f"a list of {popsize} candidates (history's popsize)", candidates)
                for x in candidates:
                    _vector(f"line {g} candidates", x)
                    dimension = dimension or len(x)
                    _need(len(x) == dimension, f"line {g} candidates", f"vectors of {dimension} numbers", x)
                _need(isinstance(losses, list) and len(losses) == popsize and all(_is_number(v) for v in losses),
                      f"line {g} losses", f"{popsize} finite numbers", losses)
                exchanges.append({"candidates": candidates, "losses": losses})
    except OSError as e:
        raise RunStateError(f"Calibri: the optimiser log {path!r} cannot be read ({e.strerror or e}): "
                            f"{_RESTART}.") from None
    except _Bad as e:
        raise RunStateError(f"Calibri: the optimiser log {path!r} is damaged: {e}; the run cannot be continued "
                            f"from it: {_RESTART}.") from None
    for where, best in (("best_train", state.best_train), ("best_val", state.best_val)):
        if best is not None and len(best["x"]) != dimension:
            raise RunStateError(f"Calibri: {os.path.join(os.path.dirname(path), STATE_FILE)!r} is damaged: "
                                f"{where}.x has {len(best['x'])} values, the optimiser log's candidates "
                                f"{dimension}: {_RESTART}.")
    return exchanges


def load_state(run_dir: str) -> SavedRun | None:
    """The saved state and optimiser log, validated (no model needed), or None when the run dir has no state yet.

    Raises :class:`RunStateError` for a pickle in the run dir, a state.json of another version, and any file that is
    not what this Calibri writes.
    """
    refuse_pickles(run_dir)
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    payload = read_json_file(path, "the run state")
    version = payload.get("version") if isinstance(payload, dict) else None
    if version != STATE_VERSION:
        raise RunStateError(f"Calibri: {path!r} has state version {version!r}; this Calibri reads version "
                            f"{STATE_VERSION} (version 1 pickled its optimiser, which is never loaded). Resume with "
                            f"the Calibri version that started the run, or {_RESTART}.")
    try:
        state = _check_state(payload)
    except _Bad as e:
        raise RunStateError(f"Calibri: the run state {path!r} is damaged: {e}; the run cannot be continued from it: "
                            f"{_RESTART}.") from None
    return SavedRun(state, _check_exchanges(os.path.join(run_dir, OPTIMIZER_LOG), state))


class RunLock:
    """An exclusive lock on a run dir for this process's lifetime: ``RUN_DIR/run.lock``, held with ``flock``
    (``msvcrt.locking`` on Windows) and holding the holder's PID. A second process gets :class:`RunStateError`
    naming that PID. The kernel drops the lock when its process exits or is killed, so a stale file never blocks.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunStateError(f"Calibri: run dir {os.path.dirname(self.path)!r} is in use by process {holder} "
                                f"(lock {self.path!r}); wait for it to finish or stop it, then resume.") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (a later holder rewrites the PID)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_of(run_dir: str) -> int | str | None:
    """The PID holding ``run_dir``'s lock, or None when no live process holds it (``--check``)."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with RunLock(run_dir):
            return None
    except RunStateError:
        fd = os.open(path, os.O_RDONLY)
        try:
            return _read_pid(fd)
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:  # Windows: the locked byte cannot be read
        text = ""
    return int(text) if text.isdigit() else "(unknown PID)"


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:  # Windows
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
