"""How a coder's training is split over the processes of a run (``torchrun``), and how the parts
make the whole again.

- :class:`Replicated` (the default): every process holds the whole coder and codes 1/N of each
  micro-batch; each one's loss is its share of the batch's, and the gradients are summed.
- :class:`LayersSplit` (``--distribute-layers``, per-layer coders): process r holds the SAEs of
  a contiguous block of layers. The activations are exchanged (all-to-all: each process sends
  every other its layers of the rows it read), so each codes the WHOLE micro-batch at its own
  layers, and no gradient is exchanged.
- :class:`LatentsSplit` (``--shard-latents``): process r holds a slice of every dictionary's
  latents (:mod:`mlsae.sharding`); the micro-batch is gathered whole on every process and the
  top k merged across them, so the codes are exactly one process's.

Every placement trains the same coder on the same global batches, and the run folder does not
depend on it: the whole coder (and the optimizer's state for it) is assembled on rank 0 to be
written, and each process takes its part of a checkpoint to resume. The dead-latent clocks are
the whole coder's on every process.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from .config import TrainConfig
from .dist import World
from .errors import MlsaeError
from .sae import SparseCoder, TopK
from .sharding import LatentShard, split_sizes


class Replicated:
    """The whole coder on every process; the rows of each micro-batch split over the processes."""

    def __init__(self, world: World):
        self.world = world

    # The coder and its state, whole <-> this process's part
    def part(self, whole: SparseCoder) -> SparseCoder:
        """This process's part of a freshly built (or loaded) whole coder."""
        return whole

    def whole(self, part: SparseCoder) -> Optional[SparseCoder]:
        """The whole coder, on rank 0 (on the CPU, unless nothing had to be assembled); None elsewhere."""
        return part if self.world.writes else None

    def whole_optimizer(self, part: SparseCoder, optimizer: torch.optim.Optimizer, whole: Optional[SparseCoder]) -> Optional[dict]:
        """The optimizer's ``state_dict`` for ``whole`` (what :meth:`whole` gave: the coder on
        rank 0, None elsewhere), on rank 0; None elsewhere."""
        return optimizer.state_dict() if self.world.writes else None

    def part_optimizer(self, whole: SparseCoder, part: SparseCoder, opt: dict) -> dict:
        """This process's share of a whole coder's optimizer ``state_dict``."""
        return opt

    # What the part codes and how its numbers add up
    rows_scale = property(lambda self: self.world.size)  # the part's rows are 1/N of the batch's
    loss_scale = 1.0  # the part's loss, as a share of the whole coder's (over layers)

    def inputs(self, x: Tensor) -> Tensor:
        """This process's rows ``[n, layers, d]`` -> what its part codes."""
        return x

    def layers_of(self, x: Tensor) -> Tensor:
        """The layers of the whole batch ``x: [N, layers, d]`` that the part codes."""
        return x

    def own_rows(self, x: Tensor) -> Tensor:
        """The rows of the whole batch ``x: [N, ...]`` that this process codes (as :meth:`inputs` gives them)."""
        return x[self.world.rank :: self.world.size]

    @property
    def total(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Sums a loss statistic over the processes, when each codes part of the rows."""
        return self.world.sum if self.world.distributed else None

    def spread(self, v: Tensor) -> Tensor:
        """A per-layer number at the part's layers -> ``[layers]`` (zero at the layers of other parts)."""
        return v

    def step_sum(self, v: Tensor) -> Tensor:
        """A step's number (a loss, ``spread`` per-layer numbers) as this process holds it -> the
        whole batch's: here each process holds its rows' share of it."""
        return self.world.sum(v)

    def dead_part(self, dead: Optional[Tensor]) -> Optional[Tensor]:
        """The whole coder's dead latents -> the part's (in its ``latent_shape``)."""
        return dead

    def fired(self, part_fired: Tensor) -> Tensor:
        """The part's fired latents -> the whole coder's, on every process (fired anywhere)."""
        return self.world.any(part_fired)

    def sync_grads(self, params) -> None:
        self.world.sum_grads(params)

    def latents_here(self, n_latents: int) -> int:
        """Latents of each dictionary held by this process (for memory estimates)."""
        return n_latents


def _gather_to_first(world: World, obj) -> Optional[list]:
    """Every process's ``obj`` (tensors moved to the CPU), on rank 0, in rank order; None elsewhere."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.writes else None
    tdist.gather_object(obj, out, dst=0)
    return out


def _named_moments(coder: SparseCoder, opt: dict) -> dict[str, Tensor]:
    """An optimizer ``state_dict``'s moments keyed ``parameter-name/moment`` (on the CPU)."""
    names = [n for n, _ in coder.named_parameters()]
    return {f"{names[i]}/{m}": v.detach().cpu() for i, st in opt["state"].items() for m, v in st.items()}


def _indexed_moments(coder: SparseCoder, named: dict[str, Tensor], param_groups: list) -> dict:
    """:func:`_named_moments` back to a ``state_dict`` for ``coder``'s parameters."""
    index = {n: i for i, (n, _) in enumerate(coder.named_parameters())}
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in named.items():
        name, moment = key.rsplit("/", 1)
        state.setdefault(index[name], {})[moment] = v
    groups = [{**g, "params": list(range(len(index)))} for g in param_groups[:1]]
    return {"state": state, "param_groups": groups}


class _Split(Replicated):
    """A placement where each process holds part of the coder's tensors: the part and the whole are
    converted through their state dicts by :meth:`_join` and :meth:`_take`, which name how each
    tensor is split."""

    rows_scale = 1  # every process codes the whole micro-batch (at its layers, or for its latents)

    def _join(self, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _take(self, whole: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _empty_part(self, whole: SparseCoder) -> SparseCoder:
        raise NotImplementedError

    def part(self, whole):
        part = self._empty_part(whole)
        part.load_state_dict(self._take(whole.state_dict()))
        return part

    def whole(self, part):
        parts = _gather_to_first(self.world, {k: v.detach().cpu() for k, v in part.state_dict().items()})
        if parts is None:
            return None
        whole = type(part)(part.cfg, part.d_model, self.all_layers)
        whole.load_state_dict(self._join(parts))
        return whole

    def whole_optimizer(self, part, optimizer, whole):
        opt = optimizer.state_dict()
        parts = _gather_to_first(self.world, _named_moments(part, opt))
        return None if parts is None else _indexed_moments(whole, self._join(parts), opt["param_groups"])

    def part_optimizer(self, whole, part, opt):
        named = _named_moments(whole, opt)
        return _indexed_moments(part, self._take(named), opt["param_groups"])

    @property
    def total(self):
        return None  # the part sees the whole batch's rows

    def own_rows(self, x):
        return x

    def sync_grads(self, params) -> None:
        return None  # each process owns its tensors' gradients; the whole ones agree by construction


class LayersSplit(_Split):
    """Per-layer coders: process r holds the SAEs of layers ``blocks[r]`` (contiguous)."""

    def __init__(self, world: World, layers: list[int]):
        super().__init__(world)
        if world.size > len(layers):
            raise MlsaeError(f"--distribute-layers with {world.size} processes and {len(layers)} layers: each process needs at "
                             f"least one layer (use at most {len(layers)} processes)")
        self.all_layers = list(layers)
        sizes = split_sizes(len(layers), world.size)
        starts = [sum(sizes[:r]) for r in range(world.size)]
        self.blocks = [slice(s, s + n) for s, n in zip(starts, sizes)]
        self.mine = self.blocks[world.rank]
        self.loss_scale = sizes[world.rank] / len(layers)  # the part's mean over its layers -> its share of the mean over all

    def _empty_part(self, whole):
        return type(whole)(whole.cfg, whole.d_model, self.all_layers[self.mine])

    def _take(self, whole):
        out = {}
        for key, t in whole.items():
            head, _, rest = key.partition(".")
            if head == "saes":
                i, _, name = rest.partition(".")
                if self.mine.start <= int(i) < self.mine.stop:
                    out[f"saes.{int(i) - self.mine.start}.{name}"] = t
            else:
                out[key] = t if t.dim() == 0 else self._layer_rows(key, t, len(self.all_layers))[self.mine]
        return out

    def _join(self, parts):
        out = {}
        for r, (block, part) in enumerate(zip(self.blocks, parts)):
            for key, t in part.items():
                head, _, rest = key.partition(".")
                if head == "saes":
                    i, _, name = rest.partition(".")
                    out[f"saes.{int(i) + block.start}.{name}"] = t
        for key, t in parts[0].items():
            if not key.startswith("saes."):
                out[key] = t if t.dim() == 0 else torch.cat(
                    [self._layer_rows(key, p[key], b.stop - b.start) for b, p in zip(self.blocks, parts)])
        return out

    @staticmethod
    def _layer_rows(key: str, t: Tensor, n_layers: int) -> Tensor:
        """A per-layer tensor of the transforms: one row per layer, which the placement splits."""
        if t.shape[0] != n_layers:
            raise MlsaeError(f"{key} of shape {tuple(t.shape)} is not one row per layer: --distribute-layers cannot split it")
        return t

    def inputs(self, x):
        """Exchange: every process sends each other the other's layers of its rows; the rows come
        back in the order one process reads them (row i from process i mod N)."""
        if not self.world.distributed:
            return x
        n, _, d = x.shape
        send = torch.cat([x[:, b].reshape(-1) for b in self.blocks])
        mine = self.mine.stop - self.mine.start
        got = torch.empty(self.world.size * n * mine * d, dtype=x.dtype, device=x.device)
        tdist.all_to_all_single(got, send, output_split_sizes=[n * mine * d] * self.world.size,
                                input_split_sizes=[n * (b.stop - b.start) * d for b in self.blocks])
        return got.view(self.world.size, n, mine, d).transpose(0, 1).reshape(self.world.size * n, mine, d)

    def layers_of(self, x):
        return x[:, self.mine]

    def spread(self, v):
        out = torch.zeros(len(self.all_layers), dtype=v.dtype, device=v.device)
        out[self.mine] = v
        return out  # step_sum (inherited) adds the processes' layers together

    def dead_part(self, dead):
        return None if dead is None else dead[self.mine]

    def fired(self, part_fired):
        out = torch.zeros((len(self.all_layers), *part_fired.shape[1:]), dtype=torch.bool, device=part_fired.device)
        out[self.mine] = part_fired
        return self.world.any(out)


class LatentsSplit(_Split):
    """Every dictionary's latents split over the processes (rows ``starts[r] : starts[r] + sizes[r]``)."""

    def __init__(self, world: World, n_latents: int, layers: list[int]):
        super().__init__(world)
        if world.size > n_latents:
            raise MlsaeError(f"--shard-latents with {world.size} processes and {n_latents} latents: each process needs at least one")
        self.all_layers = list(layers)
        self.sizes = split_sizes(n_latents, world.size)
        self.starts = [sum(self.sizes[:r]) for r in range(world.size)]
        self.n_latents = n_latents

    @staticmethod
    def _sharded(key: str, t: Tensor) -> bool:
        """A tensor with a row per latent (a sharded parameter, or an optimizer moment of one; not its step count)."""
        return t.dim() > 0 and key.split("/")[0].rsplit(".", 1)[-1] in TopK.SHARDED

    def _empty_part(self, whole):
        r = self.world.rank
        part = type(whole)(whole.cfg, whole.d_model, whole.layers)
        for d in part.dictionaries():
            for name in TopK.SHARDED:
                t = getattr(d, name)
                if t is None:
                    continue
                rows = t.detach()[self.starts[r] : self.starts[r] + self.sizes[r]].clone()
                if isinstance(t, nn.Parameter):
                    setattr(d, name, nn.Parameter(rows))
                else:
                    d.register_buffer(name, rows)
            d.shard = LatentShard(self.world, self.starts[r], self.sizes[r], self.n_latents)
        return part

    def _take(self, whole):
        r = self.world.rank
        return {k: (t[self.starts[r] : self.starts[r] + self.sizes[r]] if self._sharded(k, t) else t) for k, t in whole.items()}

    def _join(self, parts):
        return {k: (torch.cat([p[k] for p in parts]) if self._sharded(k, t) else t) for k, t in parts[0].items()}

    def inputs(self, x):
        return self.world.interleave_rows(x)  # the whole micro-batch, in one process's order

    def step_sum(self, v):
        return v  # every process computed the whole batch's numbers

    def fired(self, part_fired):
        return part_fired  # the codes (whole-dictionary indices) are the same on every process

    def latents_here(self, n_latents):
        return self.sizes[self.world.rank]


def placement_for(cfg: TrainConfig, world: World, layers: list[int], latent_space: str, n_latents: int) -> Replicated:
    """The placement ``cfg`` asks for, or a one-line refusal of a combination that cannot work."""
    if cfg.distribute_layers and cfg.shard_latents:
        raise MlsaeError("--distribute-layers and --shard-latents: choose one way to split the coder over the processes")
    if cfg.distribute_layers:
        if latent_space != "per_layer":
            raise MlsaeError(f"--distribute-layers splits a per-layer coder's SAEs over the processes; a {cfg.arch} coder has "
                             f"one dictionary for every layer (use --shard-latents to split its latents)")
        return LayersSplit(world, layers)
    if cfg.shard_latents:
        if cfg.post_bias:
            raise MlsaeError("--shard-latents with --post-bias: the post-activation bias is not supported on a sharded dictionary")
        return LatentsSplit(world, n_latents, layers)
    return Replicated(world)
