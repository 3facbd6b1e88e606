"""Input transforms: maps of the residual vectors ``x: [tokens, layers, d]`` into the space the
sparse coder sees, and back.

A transform is an object with ``forward`` (x -> the coder's input, plus what its inverse needs)
and ``inverse`` (the coder's output -> x's units). Transforms estimated from data are ``fit``
once, on the first training batches, and then frozen; their state lives in buffers, so it is
saved with the coder's weights and restored with them. Training, evaluation and analysis all
reach the coder through :meth:`mlsae.sae.SparseCoder.forward`, which applies the run's
transforms, so the loss space cannot differ between them.

- :class:`Standardize`: each vector to zero mean and unit variance over its d components
  (Lawson et al. 2025, section 3.1); stateless.
- :class:`LayerCentering`: subtract each layer's mean vector (estimated in the space it
  receives, then frozen) before the encoder and add it back after the decoder. One b_pre shared
  by all layers (eq. 1) cannot centre layers whose means differ; this does, and FVU per layer is
  unchanged by it because FVU measures the error against the variance around the per-layer
  mean, and a constant shift moves neither.
- :class:`LensTransform`: a tuned lens's translators x' = x + W_l x + b_l (Lawson et al. section
  3.3, eqs. 8-9; :mod:`mlsae.lens`), frozen, undone with (I + W_l)^-1 computed once.
- :class:`Pipeline`: a composition, applied in order and inverted in reverse.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .errors import MlsaeError


def standardize(x: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Zero mean, unit variance over the last dimension; returns (x_std, mean, std) to undo it."""
    mean = x.mean(-1, keepdim=True)
    std = (x.var(-1, keepdim=True, correction=0) + eps).sqrt()
    return (x - mean) / std, mean, std


class InputTransform(nn.Module):
    """Base: ``forward(x) -> (y, state)``, ``inverse(y, state) -> x``, ``fit(x)`` for estimated ones."""

    name: ClassVar[str]

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def inverse(self, y: Tensor, state: Any) -> Tensor:
        raise NotImplementedError

    def inverse_delta(self, dy: Tensor, state: Any) -> Tensor:
        """The linear part of ``inverse``: maps a difference of outputs (an error) back to x's units."""
        raise NotImplementedError

    def forward_delta(self, dx: Tensor, state: Any) -> Tensor:
        """The inverse of :meth:`inverse_delta`: a difference in x's units mapped into the output
        space with the state held fixed (for following small moves, as the information flow does)."""
        raise NotImplementedError

    def fit(self, x: Tensor) -> None:
        """Estimate the frozen state from ``x: [tokens, layers, d]``; stateless transforms do nothing."""

    def describe(self) -> list[str]:
        return [self.name]


class Standardize(InputTransform):
    """Per vector: zero mean and unit variance over its components (stateless)."""

    name = "standardize"

    def forward(self, x):
        y, mean, std = standardize(x)
        return y, (mean, std)

    def inverse(self, y, state):
        mean, std = state
        return y * std + mean

    def inverse_delta(self, dy, state):
        return dy * state[1]

    def forward_delta(self, dx, state):
        return dx / state[1]


class LayerCentering(InputTransform):
    """Subtract a frozen mean vector per layer; ``mean: [layers, d]`` is fitted once on data."""

    name = "center_layers"

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_layers, d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _check(self) -> None:
        if not bool(self.fitted):
            raise MlsaeError(
                "the per-layer centring is not fitted: call initialise() on a first batch (training does so before its "
                "first step; a run saved before that has none)"
            )

    def forward(self, x):
        self._check()
        return x - self.mean.to(x.dtype), None

    def inverse(self, y, state):
        return y + self.mean.to(y.dtype)

    def inverse_delta(self, dy, state):
        return dy

    def forward_delta(self, dx, state):
        return dx

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1:] != self.mean.shape:
            raise MlsaeError(f"layer centring fitted on shape {tuple(x.shape)}: expected [tokens, {self.mean.shape[0]}, {self.mean.shape[1]}]")
        self.mean.copy_(x.double().mean(0).to(self.mean.dtype))
        self.fitted.fill_(True)


class Pipeline(InputTransform):
    """Transforms applied in order; the inverse runs them backwards with each one's saved state."""

    name = "pipeline"

    def __init__(self, steps: Sequence[InputTransform]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x):
        states = []
        for t in self.steps:
            x, s = t(x)
            states.append(s)
        return x, states

    def inverse(self, y, state):
        for t, s in zip(reversed(self.steps), reversed(state)):
            y = t.inverse(y, s)
        return y

    def inverse_delta(self, dy, state):
        for t, s in zip(reversed(self.steps), reversed(state)):
            dy = t.inverse_delta(dy, s)
        return dy

    def forward_delta(self, dx, state):
        for t, s in zip(self.steps, state):
            dx = t.forward_delta(dx, s)
        return dx

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Fit each step on what it receives: the output of the steps before it."""
        for t in self.steps:
            t.fit(x)
            x, _ = t(x)

    def describe(self) -> list[str]:
        return [name for t in self.steps for name in t.describe()]


class LensTransform(InputTransform):
    """The lens's translators for a run's layers, frozen, with (I + W_l)^-1 computed once."""

    name = "tuned_lens"

    def __init__(self, weight: Tensor, bias: Tensor, layers: Sequence[int]):
        super().__init__()
        eye = torch.eye(weight.shape[-1], dtype=torch.float64)
        inverses = []
        for layer, W in zip(layers, weight.double()):
            A = eye + W
            if torch.linalg.matrix_rank(A) < A.shape[0]:
                raise MlsaeError(f"the lens's translator at layer {layer} is singular (I + W is not invertible): it cannot be undone")
            inverses.append(torch.linalg.inv(A))
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.register_buffer("inverses", torch.stack(inverses).float())

    @classmethod
    def from_lens(cls, lens, layers: Sequence[int]) -> "LensTransform":
        """The translators of ``layers`` from a :class:`mlsae.lens.TunedLens`."""
        bad = [l for l in layers if not 0 <= l < lens.n_blocks]
        if bad:
            raise MlsaeError(f"the lens has {lens.n_blocks} blocks, not layer {bad[0]}: it belongs to another model")
        return cls(lens.weight[list(layers)], lens.bias[list(layers)], layers)

    @classmethod
    def identity(cls, n_layers: int, d: int) -> "LensTransform":
        """A placeholder of the right shape, filled by loading a coder's saved state."""
        return cls(torch.zeros(n_layers, d, d), torch.zeros(n_layers, d), list(range(n_layers)))

    def forward(self, x):
        return x + torch.einsum("...ld,lod->...lo", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype), None

    def inverse(self, y, state):
        return self.inverse_delta(y - self.bias.to(y.dtype), state)

    def inverse_delta(self, dy, state):
        return torch.einsum("...ld,lod->...lo", dy, self.inverses.to(dy.dtype))

    def forward_delta(self, dx, state):
        return dx + torch.einsum("...ld,lod->...lo", dx, self.weight.to(dx.dtype))


def build_transforms(standardize: bool, center_layers: bool, n_layers: int, d: int, lens: bool = False) -> Pipeline:
    """The input transforms a coder's settings ask for, in the order they are applied: the tuned
    lens on the model's own vectors, then standardising, then centring."""
    steps: list[InputTransform] = [LensTransform.identity(n_layers, d)] if lens else []
    if standardize:
        steps.append(Standardize())
    if center_layers:
        steps.append(LayerCentering(n_layers, d))
    return Pipeline(steps)
