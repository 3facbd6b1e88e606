"""torch.distributed for data-parallel training under ``torchrun``: one process per rank, NCCL on
GPUs and gloo on CPU, rank 0 the only writer.

``torchrun --nproc-per-node N mlsae train ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`world` starts the process group from them once, and is a single process (rank 0 of 1, no
process group) without them. Everything else asks the :class:`World` it returns: which rank it is,
whether it writes, and the collective operations training needs (sums of gradients, of loss
statistics and of the dead-latent counters, and gathering the first batches the transforms are
fitted on), each of which is the identity in a single process.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist
from torch import Tensor

from .errors import MlsaeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run folder, the metrics and the progress bar; the others compute."""
        return self.rank == 0

    def _sendable(self, t: Tensor) -> Tensor:
        """``t`` where the backend can send it: NCCL moves GPU tensors only, so a CPU one goes to this rank's GPU."""
        return t.to(f"cuda:{self.local_rank}") if t.device.type == "cpu" and tdist.get_backend() == "nccl" else t

    def _reduce(self, t: Tensor, op) -> Tensor:
        """All-reduce ``t`` in place (through the GPU for a CPU tensor under NCCL)."""
        sent = self._sendable(t)
        tdist.all_reduce(sent, op=op)
        return t if sent is t else t.copy_(sent)

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in place; the identity in one process)."""
        return self._reduce(t, tdist.ReduceOp.SUM) if self.distributed else t

    def any(self, t: Tensor) -> Tensor:
        """A bool tensor OR-ed over the ranks (which latents fired anywhere)."""
        if not self.distributed:
            return t
        return self._reduce(t.to(torch.uint8), tdist.ReduceOp.MAX).bool()

    def sum_grads(self, params) -> None:
        """Every parameter's gradient summed over the ranks: each rank's loss is its share of the
        global batch's loss (global denominators), so the sum is the global gradient."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def interleave_rows(self, t: Tensor) -> Tensor:
        """Every rank's rows of ``t`` (equal counts), in stream order: rank r holds the stream
        positions r, r + size, ..., so row i of the result is row i // size of rank i % size."""
        if not self.distributed:
            return t
        self.same_everywhere(t.shape[0], "the number of rows to gather")
        return torch.stack(self.gather(t), 1).reshape(-1, *t.shape[1:])

    def same_everywhere(self, value: int, what: str) -> None:
        """Refuse to go on unless every rank holds the same ``value`` (say, a resumed step)."""
        if not self.distributed:
            return
        t = self._reduce(torch.tensor([value, -value], dtype=torch.int64), tdist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise MlsaeError(f"the ranks disagree on {what} ({-int(t[1])} to {int(t[0])}); every rank must start alike")

    def sum_fields(self, obj, names) -> None:
        """Sum the named attributes of an accumulator (tensors, ints, floats) over the ranks, in place."""
        if not self.distributed:
            return
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, Tensor):
                setattr(obj, name, self.sum(value.contiguous()))
            else:
                total = self.sum(torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64))
                setattr(obj, name, type(value)(total.item()))

    def gather(self, t: Tensor) -> list[Tensor]:
        """``t`` from every rank (same shapes), in rank order."""
        if not self.distributed:
            return [t]
        src = self._sendable(t)
        parts = [torch.empty_like(src) for _ in range(self.size)]
        tdist.all_gather(parts, src.contiguous())
        return [p.to(t.device) for p in parts]

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()


_WORLD: Optional[World] = None


def world(device: Optional[torch.device] = None) -> World:
    """The process group set by torchrun's environment (started on first use), or one process."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        atexit.register(_close)  # a process group left open can abort the interpreter at exit
    _WORLD = World(rank, size, local_rank)
    return _WORLD


def _close() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def device_for(name: str, w: World) -> str:
    """Under torchrun on GPUs each rank takes its own: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    return f"cuda:{w.local_rank}" if w.distributed and name in ("cuda", "auto") and torch.cuda.is_available() else name
