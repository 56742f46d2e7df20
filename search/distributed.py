"""Sharding the search over processes with torch.distributed (``torchrun --nproc_per_node=K``, multi-node too).

Rank 0 owns the optimiser and every file. For each evaluation it sends the candidates, the prompts, the seed and,
once generation 1 has measured it, the run's pack size (every rank's evaluator packs with rank 0's ``batch_size``);
the generation is cut into chunks of ``search.candidates_per_call`` candidates, each packed into one evaluator
call, and chunk j is scored by rank ``j % world`` — every candidate lands in the same batch as in a single process,
so the fitness values and hence the final preset do not depend on the number of processes.
Backend: nccl when CUDA is available, else gloo.

Failing fast: every collective of the search is one :func:`exchange` (an ``all_gather_object`` of each rank's
``(rank, error message or None, payload)``), and every rank makes the same sequence of them. A rank whose code raises
goes straight to its next exchange carrying the error instead of a payload; whichever exchange the other ranks are
at, it matches, so every rank learns of the failure at once and raises: the failing rank its own exception, the
others :class:`RankFailed` with the failing rank's message. The exchanges are: one after the set-up (rank 0 prepares
the run dir, every rank builds its evaluator; :func:`step`), rank 0's model digests (:func:`from_rank0`, so multi-GB
files are hashed once), then per evaluation rank 0's message and one status exchange after each round of evaluator
calls (so a failure is noticed within one evaluator call of the slowest rank). An exception in rank 0's own code
between evaluations (optimiser, files) is sent to the waiting ranks as the next message. After a failure no rank
waits in a barrier, so ``torchrun`` sees every process exit non-zero within seconds.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

logger = logging.getLogger("calibri")


class RankFailed(RuntimeError):
    """Raised on every rank that did not fail itself when another rank's code raised; carries that rank's message."""


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False
    failed: bool = False  # a rank failed: no barrier at shutdown

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or return a single-process context."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        owns = True
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns)


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, RankFailed) else f"{type(error).__name__}: {error}"


def exchange(ctx: DistContext | None, payload: Any = None, error: BaseException | None = None) -> list:
    """The one collective of the search: every rank sends ``payload`` (or its ``error``) and gets every rank's
    payload, in rank order. If any rank sent an error, ``ctx.failed`` is set and a rank that sent none raises
    :class:`RankFailed` with the failing ranks' messages; a rank that sent one gets None back and re-raises its own.
    ``ctx`` None: the default process group (``from_rank0``)."""
    import torch.distributed as dist

    rank, world = (ctx.rank, ctx.world) if ctx is not None else (dist.get_rank(), dist.get_world_size())
    box: list = [None] * world
    dist.all_gather_object(box, (rank, _describe(error) if error is not None else None,
                                 None if error is not None else payload))
    failures = [(r, message) for r, message, _ in box if message is not None]
    if not failures:
        return [item[2] for item in box]
    if ctx is not None:
        ctx.failed = True
    text = "; ".join(message if message.startswith("Calibri: rank ") else f"Calibri: rank {r} failed: {message}"
                     for r, message in failures)
    if error is None:
        raise RankFailed(text)
    return None


@contextmanager
def step(ctx: DistContext) -> Iterator[None]:
    """Run a block on every rank, then agree: if the block raised on any rank, every rank raises (see module doc)."""
    if ctx.world <= 1:
        yield
        return
    try:
        yield
    except RankFailed:  # learnt in an exchange inside the block: every rank knows already
        ctx.failed = True
        raise
    except Exception as e:
        exchange(ctx, error=e)
        raise
    except BaseException:  # an interrupt: the others are most likely interrupted too
        ctx.failed = True
        raise
    exchange(ctx)


def from_rank0(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0 only, its result shared with every rank of the default process group (one
    exchange: a failure on rank 0, or on a rank that reaches this point failing, ends every rank). Without a group
    of more than one process: just ``compute()``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return compute()
    value, error = None, None
    if dist.get_rank() == 0:
        try:
            value = compute()
        except Exception as e:
            error = e
    result = exchange(None, value, error)
    if error is not None:
        raise error
    return result[0]


def evaluate_each(evaluator: Any, candidates: Sequence, prompts: list[str], seed: int, chunks: Sequence[Sequence[int]],
                  on_done: Callable[[], None] | None = None) -> dict[int, float]:
    """Score every chunk of candidate indices with one evaluator call each, all with the same prompts and seed."""
    out: dict[int, float] = {}
    for chunk in chunks:
        values = torch.as_tensor(evaluator.evaluate([candidates[i] for i in chunk], list(prompts), int(seed)),
                                 dtype=torch.float64).reshape(-1)
        if values.numel() != len(chunk):
            raise RuntimeError(f"Calibri: the evaluator returned {values.numel()} fitness values for {len(chunk)} "
                               f"candidates.")
        for i, v in zip(chunk, values.tolist()):
            out[i] = float(v)
            if on_done is not None:
                on_done()
    return out


def rank_chunks(count: int, per_call: int, rank: int, world: int) -> list[list[int]]:
    """This rank's evaluator calls: the generation is cut into consecutive chunks of ``per_call`` candidates
    (0 = one chunk per rank) and chunk j goes to rank j mod world. With ``per_call`` > 0 every candidate is
    evaluated in the same batch whatever the number of ranks, so results do not depend on it."""
    if per_call <= 0:
        return [list(range(rank, count, world))] if rank < count else []
    chunks = [list(range(start, min(start + per_call, count))) for start in range(0, count, per_call)]
    return chunks[rank::world]


def _rounds(count: int, per_call: int, world: int) -> int:
    """Evaluator calls of the busiest rank: the status exchanges of one evaluation (the same on every rank)."""
    if per_call <= 0:
        return 1
    return math.ceil(math.ceil(count / per_call) / world)


class ShardedEvaluator:
    """Rank 0's view of all ranks: the evaluator protocol's ``evaluate``, with the work split over ranks.

    Use it as a context manager around rank 0's loop: leaving it sends "stop", or the exception rank 0 raised, to the
    other ranks (unless they already know of a failure).
    """

    def __init__(self, evaluator: Any, ctx: DistContext, per_call: int = 1):
        self.evaluator, self.ctx, self.per_call = evaluator, ctx, per_call
        self.pack_rows: int | None = None
        self._open = True

    def use_pack_rows(self, rows: int) -> None:
        """Every rank's evaluator packs ``rows`` forward rows from the next evaluation on (its ``batch_size``), so
        packs are composed as in the run's first process whatever the ranks' memory (the loop records it)."""
        self.pack_rows = int(rows)
        self.evaluator.batch_size = self.pack_rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.evaluator, name)

    def evaluate_all(self, candidates: Sequence, prompts: list[str], seed: int,
                     on_done: Callable[[], None] | None = None) -> torch.Tensor:
        candidates, prompts = list(candidates), list(prompts)
        if self.ctx.world > 1:
            exchange(self.ctx, ("evaluate", candidates, prompts, int(seed), self.pack_rows))
        try:
            return _shard(self.evaluator, candidates, prompts, int(seed), self.ctx, self.per_call, on_done)
        except BaseException:
            self._open = False  # the other ranks know (an exchange) or are interrupted too: send them nothing
            raise

    def stop(self, error: BaseException | None = None) -> None:
        """Tell the other ranks to leave :func:`serve`: normally, or with rank 0's exception ``error``."""
        if not self._open or self.ctx.world <= 1:
            return
        self._open = False
        if error is None:
            exchange(self.ctx, ("stop",))
        elif isinstance(error, Exception) and not isinstance(error, RankFailed):
            exchange(self.ctx, error=error)
        else:
            self.ctx.failed = True

    def __enter__(self) -> ShardedEvaluator:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.stop(error)


def _shard(evaluator: Any, candidates: list, prompts: list[str], seed: int, ctx: DistContext, per_call: int,
           on_done: Callable[[], None] | None) -> torch.Tensor:
    mine = rank_chunks(len(candidates), per_call, ctx.rank, ctx.world)
    values = torch.zeros(len(candidates), dtype=torch.float64)
    if ctx.world <= 1:
        for i, v in evaluate_each(evaluator, candidates, prompts, seed, mine, on_done).items():
            values[i] = v
        return values
    for r in range(_rounds(len(candidates), per_call, ctx.world)):
        local, error = {}, None
        try:
            local = evaluate_each(evaluator, candidates, prompts, seed, mine[r:r + 1], on_done)
        except Exception as e:
            error = e
        gathered = exchange(ctx, local, error)
        if error is not None:
            raise error
        for part in gathered:  # Python floats through pickle: exact, NaN included
            for i, v in part.items():
                values[i] = v
    return values


def serve(evaluator: Any, ctx: DistContext, per_call: int = 1) -> None:
    """The loop of ranks > 0: evaluate their share of what rank 0 sends until it says stop (or fails)."""
    try:
        while True:
            message = exchange(ctx)[0]
            if message[0] == "stop":
                return
            _, candidates, prompts, seed, pack_rows = message
            if pack_rows is not None:
                evaluator.batch_size = pack_rows  # rank 0's recorded pack size (ShardedEvaluator.use_pack_rows)
            _shard(evaluator, candidates, prompts, seed, ctx, per_call, None)
    except BaseException:
        ctx.failed = True
        raise


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist

        if not ctx.failed:
            dist.barrier()
        dist.destroy_process_group()
