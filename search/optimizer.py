"""The optimiser behind one small ask/tell adapter (STYLE Part 2 §6).

pycma (``cma``) is imported only here. It samples from whatever ``randn`` option it is given and, when that is
``np.random.randn``, seeds NumPy's *global* RNG, which inside ComfyUI would shift every other user's randomness.
So the adapter gives pycma its own ``np.random.RandomState(seed)`` as ``randn`` and, belt and braces, swaps NumPy's
global state out around every pycma call so that nothing pycma does to it leaks out or in.

Resume never unpickles (issue 10: a pickle in a shared run dir runs code, and a checksum kept beside it only catches
accidents). With its private RNG the strategy is a deterministic function of its constructor arguments and the
sequence of ask/tell exchanges, so the run keeps that sequence as JSON (``state.py``) and :meth:`CMAOptimizer.replay`
rebuilds the strategy by repeating it, checking that every replayed ``ask`` returns the logged candidates bit for bit.

CMA-ES minimises; rewards are maximised. :func:`reward_to_loss` is the one place where a reward is negated.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence

import numpy as np


def reward_to_loss(rewards: Sequence[float]) -> tuple[np.ndarray, int]:
    """CMA-ES losses (lower is better) from rewards (higher is better), and how many were not finite.

    A NaN or ±inf reward (a candidate whose images broke the reward model, or an overflowing sample) gets the
    worst loss of the generation: one spread above the worst finite loss (or 0 when nothing was finite), so it
    ranks last without distorting pycma's step-size adaptation with infinities.
    """
    values = np.asarray([float(r) for r in rewards], dtype=np.float64)
    finite = np.isfinite(values)
    losses = -values  # the single negation: CMA-ES minimises, rewards are maximised
    bad = int((~finite).sum())
    if bad:
        good = losses[finite]
        worst = float(good.max() + (good.max() - good.min()) + 1.0) if good.size else 0.0
        worst = min(worst, float(np.finfo(np.float64).max))  # finite even for rewards near ±1e308 (JSON log)
        losses = np.where(finite, losses, worst)
    return losses, bad


def default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + ⌊3 ln n⌋ (the reference's setting)."""
    return 4 + int(3 * math.log(dimension))


@contextlib.contextmanager
def _numpy_global_state(state: dict) -> Iterator[None]:
    """Run pycma with its own copy of NumPy's global RNG state; put the caller's back afterwards."""
    outer = np.random.get_state()
    np.random.set_state(state["global"])
    try:
        yield
    finally:
        state["global"] = np.random.get_state()
        np.random.set_state(outer)


class CMAOptimizer:
    """pycma's ``CMAEvolutionStrategy`` with private randomness, box bounds and an injected start point.

    Args:
        x0: the start point (identity calibration); it is also the first candidate of generation 1.
        sigma0: initial step size (reference 0.25).
        lower, upper: per-coordinate bounds (reference: scales [-1, 2], ω [-10, 10]).
        popsize: candidates per generation; None for pycma's default 4 + 3 ln n.
        seed: seeds the strategy's private RNG.
    """

    def __init__(self, x0: Sequence[float], sigma0: float, lower: Sequence[float], upper: Sequence[float],
                 popsize: int | None, seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not import matplotlib" is irrelevant here
            import cma

        x0 = np.asarray(x0, dtype=np.float64)
        self._rng = {"global": np.random.RandomState(seed).get_state()}
        randn = np.random.RandomState(seed).randn
        opts = {
            "popsize": int(popsize) if popsize else default_popsize(x0.size),
            "bounds": [list(map(float, lower)), list(map(float, upper))],
            "randn": randn,
            # The seed lives in the private RandomState above; nan tells pycma not to touch np.random.seed.
            "seed": float("nan"),
            "verbose": -9,
        }
        with _numpy_global_state(self._rng):
            self._es = cma.CMAEvolutionStrategy(x0, float(sigma0), opts)
            self._es.inject([x0], force=True)  # x0 is evaluated in generation 1, as in the reference
        self._asked: list[np.ndarray] | None = None
        self._told: tuple[list[np.ndarray], list[float]] | None = None

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    @property
    def mean(self) -> np.ndarray:
        """The distribution mean mapped into the bounds (pycma's ``result.xfavorite``)."""
        with _numpy_global_state(self._rng):
            return np.array(self._es.result.xfavorite, dtype=np.float64)

    def stop_reasons(self) -> dict:
        with _numpy_global_state(self._rng):
            return {str(k): (v if isinstance(v, (int, float, str)) else str(v)) for k, v in self._es.stop().items()}

    def ask(self) -> list[np.ndarray]:
        """One generation of candidates (copies; the caller may keep or change them)."""
        with _numpy_global_state(self._rng):
            solutions = self._es.ask()
        self._asked = [np.array(x, dtype=np.float64) for x in solutions]
        return [x.copy() for x in self._asked]

    def tell(self, losses: Sequence[float]) -> None:
        """Report the losses of the last :meth:`ask` (same order); pycma gets copies it may modify."""
        if self._asked is None:
            raise RuntimeError("Calibri: tell() without a preceding ask().")
        if len(losses) != len(self._asked):
            raise ValueError(f"Calibri: tell() got {len(losses)} losses for {len(self._asked)} candidates.")
        with _numpy_global_state(self._rng):
            self._es.tell([x.copy() for x in self._asked], [float(v) for v in losses])
        self._told = (self._asked, [float(v) for v in losses])
        self._asked = None

    def exchange(self) -> dict:
        """The last ask/tell exchange as JSON-ready lists ({"candidates", "losses"}): what :meth:`replay` needs."""
        if self._told is None:
            raise RuntimeError("Calibri: exchange() before the first tell().")
        candidates, losses = self._told
        return {"candidates": [x.tolist() for x in candidates], "losses": [float(v) for v in losses]}

    @classmethod
    def replay(cls, x0: Sequence[float], sigma0: float, lower: Sequence[float], upper: Sequence[float],
               popsize: int | None, seed: int, exchanges: Sequence[dict]) -> "CMAOptimizer":
        """The optimiser after ``exchanges`` (from :meth:`exchange`, one per generation), rebuilt by repeating them.

        Each generation repeats what the search loop does: ask, tell the logged losses, check the stop criteria
        (pycma evaluates them once per iteration). Raises :class:`ReplayMismatch` at the first generation whose
        replayed candidates differ from the logged ones in any bit (another pycma or NumPy version, other numerics,
        or an edited log), so a run is never continued from a state it was not in.
        """
        self = cls(x0, sigma0, lower, upper, popsize, seed)
        for g, record in enumerate(exchanges, start=1):
            asked = np.array(self.ask(), dtype=np.float64)
            logged = np.asarray(record["candidates"], dtype=np.float64)
            if asked.shape != logged.shape or asked.tobytes() != logged.tobytes():
                diff = (f"max |difference| {float(np.abs(asked - logged).max()):.3g}" if asked.shape == logged.shape
                        else f"shape {logged.shape} logged, {asked.shape} replayed")
                raise ReplayMismatch(g, diff)
            self.tell(record["losses"])
            self.stop_reasons()
        return self


class ReplayMismatch(ValueError):
    """Replaying the logged exchanges did not reproduce the logged candidates (see :meth:`CMAOptimizer.replay`)."""

    def __init__(self, generation: int, detail: str):
        super().__init__(f"replaying the optimiser log gave other candidates at generation {generation} ({detail})")
        self.generation = generation
