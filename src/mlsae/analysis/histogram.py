"""Each latent's activation histogram, streamed with fixed log-spaced bins.

Activations of different latents span several decades, and one pass cannot know a latent's
range before it has seen it, so every latent shares the same bins: ``BINS_PER_DECADE`` per
factor of ten from ``LOW`` to ``HIGH``; a value below ``LOW`` counts in the first bin, one
above ``HIGH`` in the last. Only firings (activation > 0) are counted.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_codes, check_count

LOW, HIGH, BINS_PER_DECADE = 1e-3, 1e3, 8


def bin_edges() -> np.ndarray:
    """The shared edges: ``BINS_PER_DECADE`` per decade from ``LOW`` to ``HIGH``."""
    decades = round(np.log10(HIGH / LOW))
    return LOW * 10.0 ** (np.arange(decades * BINS_PER_DECADE + 1) / BINS_PER_DECADE)


class ActivationHistogram:
    """Counts of each latent's firings per bin, from codes ``[tokens, code_rows, k]``.

    ``n_rows``: code rows per token (layers; 1 for a joint code). ``per_layer``: the rows are
    layers of a bank of per-layer dictionaries, so latent ``i`` of row ``l`` is its own latent
    (one histogram per dictionary layer and latent); otherwise a latent id names the same latent
    in every row.
    """

    SUMMED = ("counts",)

    def __init__(self, n_latents: int, n_rows: int, per_layer: bool = False):
        self.n_latents = check_count("n_latents", n_latents)
        self.per_layer = bool(per_layer)
        self.n_rows = check_count("n_rows", n_rows)
        self.n_groups = self.n_latents * (self.n_rows if self.per_layer else 1)
        self.edges = torch.from_numpy(bin_edges())
        self.n_bins = len(self.edges) - 1
        self.counts = torch.zeros(self.n_groups * self.n_bins, dtype=torch.int32)  # 2^31 firings per bin is plenty

    def update(self, top_acts: Tensor, top_idx: Tensor) -> None:
        check_codes(top_acts, top_idx, self.n_latents, self.n_rows)
        acts, idx = top_acts.detach().cpu().float(), top_idx.detach().cpu().long()
        if self.per_layer:
            idx = idx + torch.arange(acts.shape[1])[None, :, None] * self.n_latents
        fired = acts > 0
        value, group = acts[fired].double(), idx[fired]
        b = (torch.bucketize(value, self.edges, right=True) - 1).clamp_(0, self.n_bins - 1)
        self.counts.index_add_(0, group * self.n_bins + b, torch.ones_like(b, dtype=torch.int32))

    def result(self, layers: list[int] | None = None) -> pa.Table:
        """Long format, non-empty bins only: latent, dictionary_layer (per-layer banks; else null),
        bin_lo, bin_hi, count."""
        counts = self.counts.view(self.n_groups, self.n_bins).numpy()
        group, b = np.nonzero(counts)
        edges = self.edges.numpy()
        if self.per_layer:
            if layers is None or len(layers) * self.n_latents != self.n_groups:
                raise ValueError("a per-layer histogram needs its dictionaries' layers")
            dictionary_layer = pa.array(np.asarray(layers, dtype=np.int64)[group // self.n_latents])
        else:
            dictionary_layer = pa.nulls(len(group), pa.int64())
        return pa.table({
            "latent": pa.array(group % self.n_latents, pa.int64()),
            "dictionary_layer": dictionary_layer,
            "bin_lo": pa.array(edges[b]),
            "bin_hi": pa.array(edges[b + 1]),
            "count": pa.array(counts[group, b], pa.int64()),
        })
