"""Sharding the search over processes with torch.distributed (``torchrun --nproc_per_node=K``, multi-node too).

Rank 0 owns the optimiser and every file. For each evaluation it broadcasts the candidates, the prompts and the
seed; the generation is cut into chunks of ``search.candidates_per_call`` candidates, each packed into one evaluator
call, and chunk j is scored by rank ``j % world`` — every candidate lands in the same batch as in a single process,
so the fitness values and hence the final preset do not depend on the number of processes. The fitness vector is
put together with one ``all_reduce`` (each entry is non-zero on its owner only, and x + 0 = x exactly, NaN included).
Backend: nccl when CUDA is available, else gloo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger("calibri")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owns_group: bool = False

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


class ShardedEvaluator:
    """Rank 0's view of all ranks: the evaluator protocol's ``evaluate``, with the work split over ranks."""

    def __init__(self, evaluator: Any, ctx: DistContext, per_call: int = 1):
        self.evaluator, self.ctx, self.per_call = evaluator, ctx, per_call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.evaluator, name)

    def evaluate_all(self, candidates: Sequence, prompts: list[str], seed: int,
                     on_done: Callable[[], None] | None = None) -> torch.Tensor:
        if self.ctx.world > 1:
            _broadcast(("evaluate", list(candidates), list(prompts), int(seed)), self.ctx)
        return _shard(self.evaluator, list(candidates), list(prompts), int(seed), self.ctx, self.per_call, on_done)

    def stop(self) -> None:
        if self.ctx.world > 1:
            _broadcast(("stop",), self.ctx)


def _broadcast(message: tuple | None, ctx: DistContext) -> tuple:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, device=torch.device(ctx.device) if ctx.device != "cpu" else None)
    return box[0]


def _shard(evaluator: Any, candidates: list, prompts: list[str], seed: int, ctx: DistContext, per_call: int,
           on_done: Callable[[], None] | None) -> torch.Tensor:
    mine = rank_chunks(len(candidates), per_call, ctx.rank, ctx.world)
    local = evaluate_each(evaluator, candidates, prompts, seed, mine, on_done)
    values = torch.zeros(len(candidates), dtype=torch.float64)
    for i, v in local.items():
        values[i] = v
    if ctx.world > 1:
        import torch.distributed as dist

        buf = values.to(ctx.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        values = buf.cpu()
    return values


def serve(evaluator: Any, ctx: DistContext, per_call: int = 1) -> None:
    """The loop of ranks > 0: evaluate their share of what rank 0 broadcasts until it says stop."""
    while True:
        message = _broadcast(None, ctx)
        if message[0] == "stop":
            return
        _, candidates, prompts, seed = message
        _shard(evaluator, candidates, prompts, seed, ctx, per_call, None)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
