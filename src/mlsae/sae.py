"""The TopK sparse coder and its arrangements over layers.

Equations are those of Lawson et al. (ICLR 2025), section 3:
    h     = ReLU(TopK(W_enc (x - b_pre)))                       (eq. 1)
    x_hat = W_dec h + b_pre                                     (eq. 2)
    FVU   = ||x - x_hat||^2 / Var(x)                            (eq. 3), per layer, then averaged
    AuxK  = ||e - e_hat||^2, e_hat from the k_aux top dead latents (eqs. 4-6), normalised per layer
            by the input's variance (like FVU) or by the error's own variance (Gao et al. 2024)
    loss  = FVU + alpha * AuxK                                  (eq. 7)

Before the first step, :meth:`SparseCoder.initialise` fits the run's frozen input transforms
(:mod:`mlsae.transforms`: standardise, per-layer centring) and starts b_pre at the geometric
median of the first batches in the space the coder sees (as Gao et al. 2024 and Lawson et
al.'s code do, the latter on the raw vectors), rather than at zero.

An arrangement decides how (token, layer) vectors meet dictionaries: ``mlsae`` sends every
layer's vector through ONE dictionary, ``per-layer`` gives each layer its own, and ``concat``
(Baskaran & Sklar) codes the concatenation of a token's layers with ONE dictionary, so each
latent reads from and writes to every layer at once. Each declares its latent space and turns
its codes into per-layer views (:meth:`SparseCoder.codes_at_layers`,
:meth:`SparseCoder.activity_by_layer`), so evaluation, analyses and the report ask it instead of
guessing from shapes. Arrangements are registered by name; the name is saved in
``config.json`` so loading picks the right class.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__
from .config import CHOICES, SAEConfig, from_dict, save_json, to_dict
from .errors import MlsaeError
from .integrity import check_tensors
from .kernels import check_impl, sparse_decode, topk_encode
from .sharding import LatentShard
from .transforms import LensTransform, build_transforms

ARRANGEMENTS: dict[str, type["SparseCoder"]] = {}


def register(name: str):
    def wrap(cls):
        if getattr(cls, "latent_space", None) not in LATENT_SPACES:
            raise TypeError(f"arrangement {name}: latent_space must be one of {LATENT_SPACES}")
        cls.arch = name
        ARRANGEMENTS[name] = cls
        return cls

    return wrap


def default_k_aux(d: int) -> int:
    """The power of 2 nearest d/2 (Gao et al. 2024, as in Lawson et al. section 3.2)."""
    return 2 ** max(0, round(math.log2(max(d / 2, 1))))


B_PRE_INITS = CHOICES["b_pre_init"]
AUXK_NORMS = CHOICES["auxk_norm"]


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-8) -> Tensor:
    """``points: [n, d]`` -> ``[d]``, the point minimising the sum of Euclidean distances.

    Weiszfeld's iteration from the mean: each step is the average of the points weighted by
    the inverse of their distance to the current estimate. Gao et al. (2024) and Lawson et al.
    start b_pre here: unlike the mean it is not dragged by a few huge vectors.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise MlsaeError(f"geometric median of shape {tuple(points.shape)}: expected [n >= 1, d]")
    p = points.double()
    y = p.mean(0)
    for _ in range(max_iter):
        w = 1 / (p - y).norm(dim=1).clamp_min(eps)
        y_next = (w[:, None] * p).sum(0) / w.sum()
        moved = float((y_next - y).norm())
        y = y_next
        if moved <= tol * max(1.0, float(y.norm())):
            break
    return y.to(points.dtype)


def start_point(points: Tensor, how: str, max_points: int = 65_536) -> Tensor:
    """Where b_pre starts for vectors ``points: [n, d]``: their geometric median, mean, or zero.

    The median is taken over at most ``max_points`` of them (a seeded random subset), which
    bounds its memory on large models.
    """
    if how == "geometric_median":
        if points.shape[0] > max_points:
            g = torch.Generator().manual_seed(0)
            points = points[torch.randperm(points.shape[0], generator=g)[:max_points].to(points.device)]
        return geometric_median(points)
    if how == "mean":
        return points.mean(0)
    if how == "zero":
        return torch.zeros_like(points[0])
    raise MlsaeError(f"b_pre_init {how!r}: expected one of {', '.join(B_PRE_INITS)}")


def fvu_per_layer(x: Tensor, x_hat: Tensor, variance_of: Optional[Tensor] = None,
                  total: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """``x, x_hat: [tokens, layers, d]`` -> ``[layers]``: sum ||x - x_hat||^2 / sum ||v - mean(v)||^2.

    v is x itself, or ``variance_of`` when the error is normalised by another tensor's variance
    (AuxK: the residual error normalised like the FVU of the input). ``total`` sums a tensor over
    the ranks of a data-parallel run: the denominator is then the whole batch's (from the ranks'
    counts, sums and sums of squares), so the ranks' values add up to the batch's FVU.
    """
    v = x if variance_of is None else variance_of
    err = (x - x_hat).pow(2).sum(dim=(0, 2))
    if total is None:
        var = (v - v.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    else:
        w = v.detach().double()
        n = total(torch.tensor(float(w.shape[0]), dtype=torch.float64, device=w.device))
        s1, s2 = total(w.sum(0)), total(w.pow(2).sum(dim=(0, 2)))
        var = (s2 - s1.pow(2).sum(-1) / n).to(v.dtype)
    return err / var.clamp_min(torch.finfo(v.dtype).tiny)


@dataclass
class CoderOutput:
    x_hat: Tensor  # [tokens, layers, d], in the input's own (raw) units
    top_acts: Tensor  # [tokens, code_rows, k]: a row per layer, or one per token (joint latents)
    top_idx: Tensor  # [tokens, code_rows, k] latent index within the row's dictionary
    fvu: Tensor  # [layers] in the loss space
    auxk: Tensor  # [layers] in the loss space (zero where no latent is dead)
    loss: Tensor  # scalar: mean FVU + alpha * mean AuxK


class TopK(nn.Module):
    """One dictionary: encoder, unit-norm decoder rows, tied pre-encoder / post-decoder bias.

    ``init="uniform"``: W_enc uniform in +-1/sqrt(d), W_dec its rows at unit norm, no encoder
    bias (Lawson et al. eq. 1). ``init="gaussian"``: encoder and decoder tied to the same unit
    Gaussian rows, with a trained encoder bias (Baskaran & Sklar). ``post_bias`` adds a trained
    per-latent bias to the active latents after TopK: h_i = ReLU(a_i + b_post_i) where a_i > 0.
    ``shard`` (set by :mod:`mlsae.placement`): this process holds only a slice of the latents,
    and encoding and decoding go through :class:`mlsae.sharding.LatentShard`.
    """

    SHARDED = ("W_enc", "W_dec", "b_enc", "b_post")
    """The tensors with a row per latent: what a sharded dictionary splits."""

    def __init__(
        self, d: int, n_latents: int, k: int, generator: Optional[torch.Generator] = None,
        init: str = "uniform", post_bias: bool = False,
    ):
        super().__init__()
        if init == "uniform":
            bound = 1 / math.sqrt(d)
            w = torch.empty(n_latents, d).uniform_(-bound, bound, generator=generator)
            self.W_enc = nn.Parameter(w.clone())
            self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True))
            self.register_buffer("b_enc", torch.zeros(n_latents))  # eq. 1 has no encoder bias
        elif init == "gaussian":
            w = torch.randn(n_latents, d, generator=generator)
            w = w / w.norm(dim=1, keepdim=True)
            self.W_enc = nn.Parameter(w.clone())
            self.W_dec = nn.Parameter(w.clone())
            self.b_enc = nn.Parameter(torch.zeros(n_latents))
        else:
            raise MlsaeError(f"dictionary init {init!r}: expected uniform or gaussian")
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.b_post = nn.Parameter(torch.zeros(n_latents)) if post_bias else None
        self.k = k
        self.shard: Optional[LatentShard] = None

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[0] if self.shard is None else self.shard.total

    def encode(self, x: Tensor, impl: str) -> tuple[Tensor, Tensor, Tensor]:
        """``x: [M, d]`` -> (top_acts [M, k], top_idx [M, k], None: the pre-activations are not kept)."""
        if self.shard is not None:
            return (*self.shard.encode(x - self.b_pre, self.W_enc, self.b_enc, self.k, impl), None)
        acts, idx, pre = topk_encode(x - self.b_pre, self.W_enc, self.b_enc, self.k, impl, keep_pre=False)
        if self.b_post is not None:
            acts = torch.where(acts > 0, torch.relu(acts + self.b_post[idx]), acts)
        return acts, idx, pre

    def decode(self, top_acts: Tensor, top_idx: Tensor, impl: str) -> Tensor:
        if self.shard is not None:
            return self.shard.decode(top_acts, top_idx, self.W_dec, impl) + self.b_pre
        return sparse_decode(top_acts, top_idx, self.W_dec, impl) + self.b_pre

    def auxk_reconstruction(self, x: Tensor, dead: Tensor, k_aux: int, impl: str) -> Optional[Tensor]:
        """e_hat of eqs. 5-6: decode the k_aux largest pre-activations among the dead latents.

        Only the dead rows of W_enc are multiplied, so the cost follows the number of dead latents.
        """
        if self.shard is not None:
            codes = self.shard.dead_top(x - self.b_pre, dead, self.W_enc, self.b_enc, k_aux)
            return None if codes is None else self.decode(*codes, impl)
        dead_idx = dead.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return None
        pre = (x - self.b_pre) @ self.W_enc[dead_idx].T + self.b_enc[dead_idx]  # [M, n_dead]
        vals, chosen = pre.topk(min(k_aux, dead_idx.numel()), dim=1)
        return self.decode(torch.relu(vals), dead_idx[chosen], impl)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Keep only the gradient component orthogonal to each (unit) decoder row."""
        g = self.W_dec.grad
        if g is not None:  # each row's dot product as a batched matmul, the update in place: no [n, d] temporaries
            parallel = torch.bmm(g.unsqueeze(1), self.W_dec.detach().unsqueeze(2)).view(-1, 1)
            g.addcmul_(parallel, self.W_dec.detach(), value=-1)


LATENT_SPACES = ("shared", "per_layer", "joint")
"""What an arrangement's latents are: ``shared`` (one dictionary read at every layer),
``per_layer`` (a dictionary per layer: latent i of layer a and of layer b are different
latents) or ``joint`` (one code per token spanning all layers). Evaluation, analyses and the
report ask the arrangement this instead of guessing from tensor shapes or names."""


class SparseCoder(nn.Module):
    """Base of the arrangements: input ``[tokens, layers, d]``, one output per (token, layer).

    Codes are ``[tokens, code_rows, k]``: one row per layer for ``shared`` and ``per_layer``
    latents, one row per token for ``joint`` ones.
    """

    arch: ClassVar[str]
    latent_space: ClassVar[str]
    scales_encoder_at_start: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, d_model: int, layers: list[int], seed: int = 0):
        super().__init__()
        if cfg.expansion_factor <= 0:
            raise MlsaeError(f"expansion_factor {cfg.expansion_factor}: expected a positive integer")
        if cfg.k <= 0:
            raise MlsaeError(f"k {cfg.k}: expected a positive integer")
        self.cfg = cfg
        self.d_model = d_model
        self.layers = list(layers)
        self.d_in = self.input_size()
        if cfg.n_latents is not None:
            n_latents = cfg.n_latents
            if cfg.k > n_latents:
                raise MlsaeError(f"--k {cfg.k} is larger than --n-latents {n_latents}: expected k <= n_latents")
        else:
            n_latents = cfg.expansion_factor * self.d_in
            if cfg.k > n_latents:
                raise MlsaeError(f"k {cfg.k} is larger than the number of latents ({n_latents} = {cfg.expansion_factor} x {self.d_in})")
        if cfg.init_gain != 1.0 and not self.scales_encoder_at_start:
            raise MlsaeError(f"--init-gain {cfg.init_gain}: only the concat arrangement scales its encoder at the start, not {self.arch}")
        if cfg.loss_space not in CHOICES["loss_space"]:
            raise MlsaeError(f"loss_space {cfg.loss_space!r}: expected standardized or raw")
        if cfg.auxk_norm not in AUXK_NORMS:
            raise MlsaeError(f"auxk_norm {cfg.auxk_norm!r}: expected one of {', '.join(AUXK_NORMS)}")
        if cfg.b_pre_init not in B_PRE_INITS:
            raise MlsaeError(f"b_pre_init {cfg.b_pre_init!r}: expected one of {', '.join(B_PRE_INITS)}")
        self.n_latents = n_latents
        self.k_aux = cfg.k_aux or default_k_aux(self.d_in)
        self.impl = check_impl(cfg.decoder_impl)  # 'auto' picks per device at each call
        self.transform = build_transforms(cfg.standardize, cfg.center_layers, len(self.layers), d_model, lens=cfg.lens is not None)

    def _lens_step(self) -> Optional[int]:
        """Where the tuned lens sits in the coder's transforms (None: a coder without one)."""
        return next((i for i, t in enumerate(self.transform.steps) if isinstance(t, LensTransform)), None)

    @torch.no_grad()
    def set_lens(self, lens) -> None:
        """Put a :class:`mlsae.lens.TunedLens`'s translators for this coder's layers into its
        transforms (before :meth:`initialise`; a coder built with ``cfg.lens`` only)."""
        i = self._lens_step()
        if i is None:
            raise MlsaeError("this coder was built without a lens (cfg.lens is not set)")
        if lens.d_model != self.d_model:
            raise MlsaeError(f"the lens reads vectors of {lens.d_model}, the model's are {self.d_model}: it belongs to another model")
        self.transform.steps[i] = LensTransform.from_lens(lens, self.layers).to(self.transform.steps[i].weight.device)

    def lens_space(self, *xs: Tensor) -> Optional[tuple[Tensor, ...]]:
        """``xs`` (raw ``[tokens, layers, d]``) through the run's tuned lens alone, or None
        without one: the translated space evaluation and analyses report beside the model's."""
        i = self._lens_step()
        return None if i is None else tuple(self.transform.steps[i](x)[0] for x in xs)

    def input_size(self) -> int:
        """Size of one example a dictionary reads: d_model, unless the arrangement joins layers."""
        return self.d_model

    # Subclasses provide these four.
    def dictionaries(self) -> list[TopK]:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of the per-latent bookkeeping (dead tracking): one entry per latent."""
        raise NotImplementedError

    def _start_b_pre(self, x: Tensor) -> None:
        """Set each dictionary's b_pre from ``x: [tokens, layers, d]`` in the coder's space."""
        raise NotImplementedError

    def _code(self, x: Tensor, dead: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Standardised ``x: [tokens, layers, d]`` -> (x_hat, top_acts, top_idx, e_hat, aux_layers).

        e_hat is None when no latent is dead; aux_layers ([layers] bool, or None for all) says
        at which layers e_hat is meaningful.
        """
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1:] != (len(self.layers), self.d_model):
            raise MlsaeError(f"input of shape {tuple(x.shape)}: expected [tokens, {len(self.layers)}, {self.d_model}]")

    @torch.no_grad()
    def initialise(self, x: Tensor) -> dict:
        """Before the first step: fit the frozen input transforms on ``x: [tokens, layers, d]``
        (raw residual vectors), then start b_pre where ``cfg.b_pre_init`` says, in the space the
        coder sees. Returns what else the arrangement did at the start, for the run's record."""
        self._check_input(x)
        self.transform.fit(x)
        x_in, _ = self.transform(x)
        self._start_b_pre(x_in)
        return self._start_scale(x_in)

    def _start_scale(self, x: Tensor) -> dict:
        """After b_pre is set: any rescaling of the starting weights (none by default)."""
        return {}

    # Per-layer views of the codes: the one place that knows what a code row means.
    def codes_at_layers(self, top_acts: Tensor, top_idx: Tensor) -> tuple[Tensor, Tensor]:
        """``[tokens, layers, k]`` codes: which latents are active at each layer, with their activation.

        A shared or per-layer code row already belongs to one layer; a joint code belongs to
        every layer (the token's one code, seen from each). L0, L1 and dead latents per layer
        are counted on this view.
        """
        return top_acts, top_idx

    def activity_by_layer(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        """``[tokens, layers, k]``: how much of each active latent lands at each layer, the
        per-layer profile the layer-distribution analyses read. For shared and per-layer
        latents it is their activation there (where they fire)."""
        return top_acts

    def layer_profile(self, top_acts: Tensor, top_idx: Tensor) -> tuple[Tensor, Tensor]:
        """``[tokens, layers, k]`` (activity, latent index): :meth:`activity_by_layer` with the
        indices of :meth:`codes_at_layers`, the pair the layer analyses read."""
        return self.activity_by_layer(top_acts, top_idx), self.codes_at_layers(top_acts, top_idx)[1]

    def forward(self, x: Tensor, dead: Optional[Tensor] = None, total: Optional[Callable[[Tensor], Tensor]] = None) -> CoderOutput:
        """Transform ``x: [tokens, layers, d]``, code it, map the output back; losses per eq. 7.

        The loss space "standardized" is the coder's own input space (after every transform:
        a per-layer shift leaves FVU unchanged); "raw" is the model's units. ``total``: this is
        one rank's share of a data-parallel batch, and the losses are its share of the batch's
        (see :func:`fvu_per_layer`).
        """
        self._check_input(x)
        x_in, state = self.transform(x)
        x_hat_in, top_acts, top_idx, e_hat, aux_layers = self._code(x_in, dead)
        x_hat = self.transform.inverse(x_hat_in, state)
        if self.cfg.loss_space == "standardized":
            target, recon = x_in, x_hat_in
        else:
            target, recon = x, x_hat
        fvu = fvu_per_layer(target, recon, total=total)
        if e_hat is None:
            auxk = torch.zeros_like(fvu)
        else:
            e = (x_in - x_hat_in).detach()
            if self.cfg.loss_space == "raw":
                e, e_hat = self.transform.inverse_delta(e, state), self.transform.inverse_delta(e_hat, state)
            # eq. 5's error, normalised per layer by the input's variance or by the error's own
            auxk = fvu_per_layer(e, e_hat, variance_of=target if self.cfg.auxk_norm == "input" else e, total=total)
            if aux_layers is not None:
                auxk = auxk * aux_layers
        loss = fvu.mean() + self.cfg.aux_coef * auxk.mean()
        return CoderOutput(x_hat, top_acts, top_idx, fvu, auxk, loss)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for d in self.dictionaries():
            d.normalize_decoder()

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        for d in self.dictionaries():
            d.remove_parallel_grads()

    def fired(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        """Bool ``latent_shape``: which latents were active (> 0) anywhere in this batch (codes
        ``[tokens, code_rows, k]`` as :meth:`forward` returns them)."""
        out = torch.zeros(self.latent_shape(), dtype=torch.bool, device=top_acts.device)
        active = top_acts > 0
        if self.latent_space != "per_layer":
            out[top_idx[active]] = True
        else:  # per layer: top_idx [tokens, layers, k]
            layer = torch.arange(top_idx.shape[1], device=top_idx.device)[None, :, None].expand_as(top_idx)
            out[layer[active], top_idx[active]] = True
        return out


@register("mlsae")
class MultiLayerSAE(SparseCoder):
    """ONE dictionary for every layer: each (token, layer) vector is its own example."""

    latent_space = "shared"

    def __init__(self, cfg: SAEConfig, d_model: int, layers: list[int], seed: int = 0):
        super().__init__(cfg, d_model, layers, seed)
        g = torch.Generator().manual_seed(seed)
        self.sae = TopK(d_model, self.n_latents, cfg.k, g, post_bias=cfg.post_bias)

    def dictionaries(self) -> list[TopK]:
        return [self.sae]

    def latent_shape(self) -> tuple[int, ...]:
        return (self.n_latents,)

    def _start_b_pre(self, x):
        self.sae.b_pre.copy_(start_point(x.reshape(-1, x.shape[-1]), self.cfg.b_pre_init))

    def _code(self, x, dead):
        n, n_layers, d = x.shape
        flat = x.reshape(n * n_layers, d)
        top_acts, top_idx, _ = self.sae.encode(flat, self.impl)
        x_hat = self.sae.decode(top_acts, top_idx, self.impl)
        e_hat = None if dead is None else self.sae.auxk_reconstruction(flat, dead, self.k_aux, self.impl)
        shape = (n, n_layers, -1)
        return (
            x_hat.view(shape),
            top_acts.view(shape),
            top_idx.view(shape),
            None if e_hat is None else e_hat.view(shape),
            None,
        )


@register("per-layer")
class PerLayerSAEs(SparseCoder):
    """One independent dictionary per layer: the single-layer baseline, trained side by side."""

    latent_space = "per_layer"

    def __init__(self, cfg: SAEConfig, d_model: int, layers: list[int], seed: int = 0):
        super().__init__(cfg, d_model, layers, seed)
        g = torch.Generator().manual_seed(seed)
        self.saes = nn.ModuleList(TopK(d_model, self.n_latents, cfg.k, g, post_bias=cfg.post_bias) for _ in layers)

    def dictionaries(self) -> list[TopK]:
        return list(self.saes)

    def latent_shape(self) -> tuple[int, ...]:
        return (len(self.layers), self.n_latents)

    def _start_b_pre(self, x):
        for i, sae in enumerate(self.saes):
            sae.b_pre.copy_(start_point(x[:, i], self.cfg.b_pre_init))

    def _code(self, x, dead):
        x_hats, acts, idxs, e_hats = [], [], [], []
        for i, sae in enumerate(self.saes):
            top_acts, top_idx, _ = sae.encode(x[:, i], self.impl)
            x_hats.append(sae.decode(top_acts, top_idx, self.impl))
            acts.append(top_acts)
            idxs.append(top_idx)
            e_hats.append(None if dead is None else sae.auxk_reconstruction(x[:, i], dead[i], self.k_aux, self.impl))
        x_hat, top_acts, top_idx = (torch.stack(t, 1) for t in (x_hats, acts, idxs))
        if all(e is None for e in e_hats):
            return x_hat, top_acts, top_idx, None, None
        aux_layers = torch.tensor([e is not None for e in e_hats], device=x.device)
        e_hat = torch.stack([torch.zeros_like(x[:, 0]) if e is None else e for e in e_hats], 1)
        return x_hat, top_acts, top_idx, e_hat, aux_layers


@register("concat")
class ConcatSAE(SparseCoder):
    """ONE dictionary over the concatenation of a token's layers (Baskaran & Sklar): every latent
    reads from and writes to all the layers at once, and each token has ONE code.

    Each layer's block is standardised on its own (the coder's input transforms) before the
    blocks are joined into one vector of size d_model x layers. Encoder and decoder start tied
    from Gaussian rows; on the first batch the encoder weight and bias are scaled by
    c * sqrt(Var(x) / Var(x_hat)), so the first reconstruction has c times the input's scale.
    Latent f's decoder row splits into one block per layer, dec_{f,l}; with unit-norm rows the
    blocks' squared norms sum to 1 and say where the latent writes.
    """

    latent_space = "joint"
    scales_encoder_at_start = True

    def __init__(self, cfg: SAEConfig, d_model: int, layers: list[int], seed: int = 0):
        super().__init__(cfg, d_model, layers, seed)
        g = torch.Generator().manual_seed(seed)
        self.sae = TopK(self.d_in, self.n_latents, cfg.k, g, init="gaussian", post_bias=cfg.post_bias)

    def input_size(self) -> int:
        return self.d_model * len(self.layers)

    def dictionaries(self) -> list[TopK]:
        return [self.sae]

    def latent_shape(self) -> tuple[int, ...]:
        return (self.n_latents,)

    def _start_b_pre(self, x):
        self.sae.b_pre.copy_(start_point(x.reshape(len(x), -1), self.cfg.b_pre_init))

    def _reconstruct(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """x_hat of ``x: [tokens, layers, d]`` in the coder's space, a chunk of tokens at a time."""
        return torch.cat([self._code(x[i : i + chunk], None)[0] for i in range(0, len(x), chunk)])

    def _start_scale(self, x):
        def total_variance(v: Tensor) -> float:
            v = v.double().reshape(len(v), -1)
            return float((v - v.mean(0)).pow(2).sum() / max(len(v) - 1, 1))

        x_hat = self._reconstruct(x)
        fvu_before = fvu_per_layer(x, x_hat)
        var_hat = total_variance(x_hat)
        scale = self.cfg.init_gain * math.sqrt(total_variance(x) / var_hat) if var_hat > 0 else 1.0
        self.sae.W_enc.mul_(scale)
        self.sae.b_enc.mul_(scale)
        fvu_after = fvu_per_layer(x, self._reconstruct(x))
        return {
            "encoder_scale": scale,
            "init_gain": self.cfg.init_gain,
            "fvu_before_scaling": float(fvu_before.mean()),
            "fvu_after_scaling": float(fvu_after.mean()),
        }

    def _code(self, x, dead):
        n, n_layers, d = x.shape
        flat = x.reshape(n, n_layers * d)
        top_acts, top_idx, _ = self.sae.encode(flat, self.impl)
        x_hat = self.sae.decode(top_acts, top_idx, self.impl).view(n, n_layers, d)
        e_hat = None if dead is None else self.sae.auxk_reconstruction(flat, dead, self.k_aux, self.impl)
        return x_hat, top_acts[:, None], top_idx[:, None], None if e_hat is None else e_hat.view(n, n_layers, d), None

    def decoder_blocks(self) -> Tensor:
        """``[latents, layers, d]``: dec_{f,l}, the part of latent f's decoder row written to layer l."""
        return self.sae.W_dec.view(self.n_latents, len(self.layers), self.d_model)

    @torch.no_grad()
    def decoder_share(self) -> Tensor:
        """``[latents, layers]``: each decoder block's share of its row's squared norm (rows sum to 1)."""
        sq = self.decoder_blocks().pow(2).sum(-1)
        return sq / sq.sum(1, keepdim=True).clamp_min(torch.finfo(sq.dtype).tiny)

    def codes_at_layers(self, top_acts, top_idx):
        shape = (top_acts.shape[0], len(self.layers), top_acts.shape[-1])
        return top_acts.expand(shape).contiguous(), top_idx.expand(shape).contiguous()

    def activity_by_layer(self, top_acts, top_idx):
        """A joint latent's activation times its decoder block's share at each layer: where it writes."""
        share = self.decoder_share().to(top_acts.device)
        return (top_acts[:, 0, :, None] * share[top_idx[:, 0]]).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Saving and loading: config.json + sae.safetensors


def save_coder(
    coder: SparseCoder, folder: str | Path, model_name: str, model_fingerprint: str, extra: Optional[dict] = None
) -> None:
    """Write the coder; each file goes to a temporary name first, then is renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "sae.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in coder.state_dict().items()}, str(tmp))
    tmp.replace(folder / "sae.safetensors")
    save_json(
        folder / "config.json",
        {
            "mlsae_version": __version__,
            "sae": to_dict(coder.cfg),
            "d_model": coder.d_model,
            "layers": coder.layers,
            "n_latents": coder.n_latents,
            "model": model_name,
            "model_fingerprint": model_fingerprint,
            **(extra or {}),
        },
    )


LEGACY_SAE_SETTINGS = {
    "center_layers": False, "b_pre_init": "zero", "auxk_norm": "input", "n_latents": None, "post_bias": False, "init_gain": 1.0,
    "lens": None,
}
"""What runs saved before these settings existed did: no centring, b_pre from zero, latents from
the expansion factor, no post-activation bias (so a resume that asks for another is refused)."""


def latent_space_of(meta: dict) -> str:
    """The latent space of the arrangement a saved ``config.json`` names."""
    arch = meta["sae"]["arch"]
    if arch not in ARRANGEMENTS:
        raise MlsaeError(f"arrangement {arch!r} is unknown; known: {', '.join(ARRANGEMENTS)}")
    return ARRANGEMENTS[arch].latent_space


def read_coder_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MlsaeError(f"{folder} holds no config.json (expected a trained sparse coder)")
    meta = json.loads(path.read_text())
    if "sae" not in meta or "layers" not in meta:
        raise MlsaeError(f"{path} is not a sparse-coder config (no 'sae' settings)")
    return meta


def load_coder(
    folder: str | Path,
    model_fingerprint: Optional[str] = None,
    arch: Optional[str] = None,
    device: str | torch.device = "cpu",
) -> tuple[SparseCoder, dict]:
    """Load a saved coder, refusing one trained on another model or of another arrangement."""
    meta = read_coder_config(folder)
    cfg = from_dict(SAEConfig, {**LEGACY_SAE_SETTINGS, **meta["sae"]})
    if cfg.arch not in ARRANGEMENTS:
        raise MlsaeError(f"{folder}: arrangement {cfg.arch!r} is unknown; known: {', '.join(ARRANGEMENTS)}")
    if arch is not None and cfg.arch != arch:
        raise MlsaeError(f"{folder} holds a {cfg.arch} coder, not {arch}")
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        raise MlsaeError(f"{folder} was trained on another model ({meta['model']}, fingerprint {meta['model_fingerprint']})")
    coder = ARRANGEMENTS[cfg.arch](cfg, meta["d_model"], meta["layers"])
    weights = Path(folder) / "sae.safetensors"
    if not weights.is_file():
        raise MlsaeError(f"{folder} holds no sae.safetensors")
    state = load_file(str(weights))
    check_tensors(coder.state_dict(), state, weights)
    coder.load_state_dict(state)
    return coder.to(device), meta
