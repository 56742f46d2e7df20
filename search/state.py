"""Everything a run needs to continue exactly where it stopped, written atomically after every generation.

``RUN_DIR/state.json`` holds the generation, the bucket permutation position, the Python / NumPy / torch RNG
states, the best candidates, validation records and the per-generation history. The optimiser (pycma and its
private RNG) is the only pickled object: ``RUN_DIR/optimizer-GGGGGG.pkl``, whose SHA-256 is stored in state.json and
checked before it is unpickled. Write order: pickle (temp, fsync, rename), then state.json (same), then the old
pickle is removed, so a kill at any instant leaves a consistent pair on disk.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from calibri_core.files import write_bytes_atomic

from .config import write_json_atomic
from .optimizer import CMAOptimizer

STATE_FILE = "state.json"
STATE_VERSION = 1


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


def save_state(run_dir: str, state: RunState, optimizer: CMAOptimizer) -> None:
    """Write the optimiser pickle and state.json atomically (see the module docstring for the order)."""
    state.rng = capture_rng()
    blob = optimizer.dumps()
    name = f"optimizer-{state.generation:06d}.pkl"
    write_bytes_atomic(os.path.join(run_dir, name), blob)
    payload = {"version": STATE_VERSION, "optimizer": {"file": name, "sha256": hashlib.sha256(blob).hexdigest()},
               **asdict(state)}
    write_json_atomic(os.path.join(run_dir, STATE_FILE), payload)
    for other in os.listdir(run_dir):
        if other.startswith("optimizer-") and other.endswith(".pkl") and other != name:
            try:
                os.unlink(os.path.join(run_dir, other))
            except OSError:
                pass


def load_state(run_dir: str) -> tuple[RunState, CMAOptimizer] | None:
    """The saved state and optimiser, or None when the run dir has no state yet."""
    import json

    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("version") != STATE_VERSION:
        raise ValueError(f"Calibri: {path!r} has state version {payload.get('version')!r}; this Calibri reads "
                         f"version {STATE_VERSION}. Resume with the Calibri version that started the run.")
    info = payload.pop("optimizer")
    payload.pop("version")
    opt_path = os.path.join(run_dir, os.path.basename(info["file"]))
    if not os.path.isfile(opt_path):
        raise ValueError(f"Calibri: the run state names optimiser checkpoint {opt_path!r}, which is missing.")
    with open(opt_path, "rb") as f:
        optimizer = CMAOptimizer.loads(f.read(), info["sha256"])
    return RunState(**payload), optimizer
