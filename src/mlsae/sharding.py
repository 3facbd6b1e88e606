"""A dictionary whose latents are split over the processes of a run (``--shard-latents``).

Process r holds rows ``start : start + count`` of W_enc, W_dec and b_enc; b_pre and the input
transforms are whole on every process, and every process codes the same (whole) micro-batch.

- encode: each process takes the top k of ITS pre-activations; the k x N candidates are gathered
  and the top k of them kept. The pre-activation of a latent does not depend on which process
  computes it, so these are exactly the latents and values one process would pick.
- decode: each process adds up the chosen latents it holds; the partial sums are summed.
- gradients: written with two collectives whose backward is the other's forward (the pattern of
  tensor-parallel layers): :func:`_same_input` is the identity forward and sums the input's
  gradient over the processes backward; :func:`_summed` sums forward and passes the gradient
  through backward. Every process then computes the same loss, its own rows' gradients, and the
  same gradient for the whole parameters (b_pre), so no gradient needs summing afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .dist import World
from .kernels import sparse_decode, topk_encode


class _SameInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, world: World) -> Tensor:
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.world.sum(g.contiguous().clone()), None


class _Summed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, world: World) -> Tensor:
        return world.sum(x.contiguous().clone())

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def _same_input(x: Tensor, world: World) -> Tensor:
    """``x`` (the same on every process) fed to this process's rows: its gradient is summed."""
    return _SameInput.apply(x, world)


def _summed(x: Tensor, world: World) -> Tensor:
    """The sum of every process's ``x``; each process's gradient passes to its own part."""
    return _Summed.apply(x, world)


def split_sizes(total: int, parts: int) -> list[int]:
    """Latents per process: as equal as can be, the first ones one larger."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


@dataclass
class LatentShard:
    """This process's slice of one dictionary's latents: rows ``start : start + count`` of ``total``."""

    world: World
    start: int
    count: int
    total: int

    def _merge(self, vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Local candidates (pre-activations ``vals`` [M, c], whole-dictionary indices ``idx``,
        c <= k) -> the top k over every process's candidates: (ReLU'd activations, indices)."""
        m, c = vals.shape
        if c < k:  # too few rows here (a small slice, or few dead latents): pad with never-chosen ones
            vals = torch.cat([vals, vals.new_full((m, k - c), -torch.inf)], 1)
            idx = torch.cat([idx, idx.new_full((m, k - c), -1)], 1)
        every_v = torch.cat(self.world.gather(vals.detach()), 1)  # [M, k x world]
        every_i = torch.cat(self.world.gather(idx), 1)
        _, pos = every_v.topk(k, dim=1, sorted=False)
        chosen = every_i.gather(1, pos)
        mine = pos // k == self.world.rank
        own = torch.where(mine, vals.gather(1, pos % k), vals.new_zeros(()))  # differentiable where mine
        return _summed(own, self.world).relu(), chosen

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, impl: str) -> tuple[Tensor, Tensor]:
        """TopK encoding of ``x: [M, d]`` (x - b_pre, whole on every process) over the whole dictionary."""
        vals, idx, _ = topk_encode(_same_input(x, self.world), W_enc, b_enc, min(k, self.count), impl, keep_pre=False, relu=False)
        return self._merge(vals, idx + self.start, k)

    def decode(self, acts: Tensor, idx: Tensor, W_dec: Tensor, impl: str) -> Tensor:
        """sum_j acts[:, j] W_dec[idx[:, j]] over the whole dictionary (without b_pre)."""
        mine = (idx >= self.start) & (idx < self.start + self.count)
        local = torch.where(mine, idx - self.start, idx.new_zeros(()))
        return _summed(sparse_decode(acts * mine, local, W_dec, impl), self.world)

    def dead_top(self, x: Tensor, dead: Tensor, W_enc: Tensor, b_enc: Tensor, k_aux: int) -> Optional[tuple[Tensor, Tensor]]:
        """AuxK's codes: the k_aux largest pre-activations among the dead latents of the whole
        dictionary (``dead``: whole, the same on every process), or None when none is dead."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k = min(k_aux, n_dead)
        rows = dead[self.start : self.start + self.count].nonzero().squeeze(1)
        pre = _same_input(x, self.world) @ W_enc[rows].T + b_enc[rows]  # [M, dead rows here]
        vals, chosen = pre.topk(min(k, rows.numel()), dim=1)
        return self._merge(vals, rows[chosen] + self.start, k)
