"""Residual-stream drift (Lawson et al. 2025, Sec. 4.2, Fig. 1): cosine similarity between the
residual vectors of adjacent captured layers at the same token, raw and mean-centred.

Streaming: per layer pair we keep float64 sums (for mean and std) and a fixed fine histogram of
the cosines over [-1, 1] (for the 10/50/90 percentiles, exact to within one bin width).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_count, check_layers, check_residual, fail, maybe

N_BINS = 20_000  # histogram bins over [-1, 1]: percentiles are exact to within 1e-4
QUANTILES = (0.1, 0.5, 0.9)
_EPS = 1e-12


class LayerMeans:
    """Mean residual vector of each captured layer: the first pass of the mean-centred drift."""

    def __init__(self, layers: Sequence[int], d: int, device: str | torch.device = "cpu"):
        self.layers = check_layers(layers)
        self.d = check_count("d", d)
        self.sum = torch.zeros(len(self.layers), self.d, dtype=torch.float64, device=device)  # [layers, d]
        self.count = 0

    def update(self, x: Tensor) -> None:
        """``x: [tokens, layers, d]``."""
        x = check_residual(x, len(self.layers))
        if x.shape[2] != self.d:
            fail(f"x: expected d = {self.d} in dimension 2, got shape {tuple(x.shape)}")
        self.sum += x.to(self.sum.device).sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def result(self) -> Tensor:
        """``[layers, d]`` float64 means."""
        if self.count == 0:
            fail("LayerMeans: no batches were given, so there is no mean")
        return self.sum / self.count


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of ``[tokens, d]`` pairs; 0 where a vector is zero (instead of NaN)."""
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return (dot / norms.clamp_min(_EPS)).clamp(-1.0, 1.0)


def hist_quantiles(hist: np.ndarray, qs: Sequence[float], lo: float = -1.0, hi: float = 1.0) -> list[float]:
    """Quantiles of the samples binned in ``hist`` (equal bins over [lo, hi]), linear within a bin."""
    cum = np.cumsum(hist)
    n, width = cum[-1], (hi - lo) / len(hist)
    out = []
    for q in qs:
        target = q * n
        b = int(np.searchsorted(cum, target, side="left"))
        before = cum[b] - hist[b]
        out.append(lo + (b + (target - before) / hist[b]) * width)
    return out


class Drift:
    """Adjacent-layer cosine similarity, per captured layer pair (layers[j], layers[j+1]).

    ``layer_means: [layers, d]`` (e.g. from :class:`LayerMeans` on a first pass) turns on the
    mean-centred variant: cosine(x_l - mu_l, x_{l+1} - mu_{l+1}). Layers are those captured,
    so a pair is adjacent in the capture list, not necessarily in the model.
    """

    SUMMED = ("sum", "sumsq", "hist", "count")
    """The state, all sums over tokens: accumulators of disjoint tokens add up to the accumulator of all."""

    def __init__(
        self,
        layers: Sequence[int],
        layer_means: Optional[Tensor] = None,
        n_bins: int = N_BINS,
        device: str | torch.device = "cpu",
    ):
        self.layers = check_layers(layers)
        if len(self.layers) < 2:
            fail(f"layers: drift needs at least 2 captured layers, got {self.layers}")
        self.n_bins = check_count("n_bins", n_bins, 2)
        self.device = torch.device(device)
        self.means: Optional[Tensor] = None  # [layers, d] float32
        if layer_means is not None:
            if not isinstance(layer_means, Tensor) or layer_means.ndim != 2 or layer_means.shape[0] != len(self.layers):
                shape = tuple(layer_means.shape) if isinstance(layer_means, Tensor) else type(layer_means).__name__
                fail(f"layer_means: expected a tensor [{len(self.layers)} layers, d], got {shape}")
            if not bool(torch.isfinite(layer_means).all()):
                fail("layer_means: contains NaN or inf")
            self.means = layer_means.to(self.device, torch.float32)
        kinds = 2 if self.means is not None else 1  # row 0: raw, row 1: centred
        pairs = len(self.layers) - 1
        self.sum = torch.zeros(kinds, pairs, dtype=torch.float64, device=self.device)
        self.sumsq = torch.zeros(kinds, pairs, dtype=torch.float64, device=self.device)
        self.hist = torch.zeros(kinds, pairs, self.n_bins, dtype=torch.int64, device=self.device)
        self.count = 0

    def _add(self, kind: int, pair: int, cos: Tensor) -> None:
        c = cos.double()
        self.sum[kind, pair] += c.sum()
        self.sumsq[kind, pair] += (c * c).sum()
        bins = ((c + 1.0) * (self.n_bins / 2.0)).long().clamp_(0, self.n_bins - 1)
        self.hist[kind, pair] += torch.bincount(bins, minlength=self.n_bins)

    def update(self, x: Tensor) -> None:
        """``x: [tokens, layers, d]`` residual vectors (rows already filtered by the caller)."""
        x = check_residual(x, len(self.layers)).to(self.device, torch.float32)
        if self.means is not None and x.shape[2] != self.means.shape[1]:
            fail(f"x: expected d = {self.means.shape[1]} (as layer_means), got shape {tuple(x.shape)}")
        for j in range(len(self.layers) - 1):
            self._add(0, j, cosine(x[:, j], x[:, j + 1]))
            if self.means is not None:
                self._add(1, j, cosine(x[:, j] - self.means[j], x[:, j + 1] - self.means[j + 1]))
        self.count += x.shape[0]

    def result(self) -> pa.Table:
        """One row per (pair, variant): layer, next_layer, centred, n_tokens, mean, std, p10, p50, p90."""
        if self.count == 0:
            fail("Drift: no batches were given")
        rows: dict[str, list] = {k: [] for k in ("layer", "next_layer", "centred", "n_tokens", "mean", "std", "p10", "p50", "p90")}
        hist = self.hist.cpu().numpy()
        for kind in range(self.sum.shape[0]):
            for j in range(len(self.layers) - 1):
                mean = float(self.sum[kind, j]) / self.count
                var = max(float(self.sumsq[kind, j]) / self.count - mean * mean, 0.0)
                p10, p50, p90 = hist_quantiles(hist[kind, j], QUANTILES)
                for key, value in zip(rows, (self.layers[j], self.layers[j + 1], kind == 1, self.count, mean, var**0.5, p10, p50, p90)):
                    rows[key].append(value)
        schema = pa.schema(
            [("layer", pa.int64()), ("next_layer", pa.int64()), ("centred", pa.bool_()), ("n_tokens", pa.int64())]
            + [(k, pa.float64()) for k in ("mean", "std", "p10", "p50", "p90")]
        )
        return pa.table(rows, schema=schema)

    def summary(self) -> dict:
        """Mean over layer pairs of the mean cosine (the paper's Fig. 1 number), raw and centred."""
        if self.count == 0:
            fail("Drift: no batches were given")
        means = (self.sum / self.count).mean(1)
        return {
            "n_tokens": self.count,
            "mean_cosine": maybe(means[0]),
            "mean_cosine_centred": maybe(means[1]) if self.means is not None else None,
        }
