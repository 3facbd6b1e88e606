"""Decoder geometry (Lawson et al. 2025, Sec. 4.3): do latents that live at nearby layers have
similar decoder directions? Cosine between decoder rows against |difference of mean layers|.

Over all pairs of live latents when there are at most ``n_pairs`` of them, otherwise over
``n_pairs`` random pairs (seeded, i != j, drawn with replacement). Assumes one shared
dictionary (MLSAE), whose latents' mean layers are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_count, fail, maybe

_CHUNK = 16_384  # pairs per gather, to bound memory at chunk * d floats


@dataclass
class DecoderGeometry:
    bins: pa.Table  # bin, dlayer_lo, dlayer_hi, n_pairs, mean_cosine, std_cosine, mean_abs_cosine
    sample: pa.Table  # latent_a, latent_b, dlayer, cosine (at most max_sample rows, for plotting)
    summary: dict  # n_live, n_pairs, exhaustive, mean_cosine, mean_abs_cosine, corr_abs_cosine_dlayer


def _mean_layers(mean_layer, n: int) -> np.ndarray:
    """Mean layer per latent as float64 with NaN for dead (accepts null/None/NaN for dead)."""
    if isinstance(mean_layer, (pa.Array, pa.ChunkedArray)):
        values = np.array([np.nan if v is None else v for v in mean_layer.to_pylist()], dtype=np.float64)
    elif isinstance(mean_layer, Tensor):
        values = mean_layer.detach().double().cpu().numpy()
    else:
        values = np.array([np.nan if v is None else v for v in mean_layer], dtype=np.float64)
    if values.ndim != 1 or values.shape[0] != n:
        fail(f"mean_layer: expected one value per latent ({n}), got shape {values.shape}")
    if np.isinf(values).any():
        fail("mean_layer: contains inf (use null/NaN for dead latents)")
    return values


def decoder_geometry(
    W_dec: Tensor,
    mean_layer: Tensor | Sequence[float | None] | pa.Array,
    n_pairs: int = 200_000,
    seed: int = 0,
    bin_width: float = 1.0,
    max_sample: int = 20_000,
) -> DecoderGeometry:
    """``W_dec: [n_latents, d]`` decoder rows, ``mean_layer: [n_latents]`` (null/NaN = dead).

    Bin b holds pairs with b * bin_width <= |mean_layer_i - mean_layer_j| < (b + 1) * bin_width;
    empty bins are left out. Cosines use the rows renormalised, so unit rows are not required.
    """
    if not isinstance(W_dec, Tensor) or W_dec.ndim != 2 or W_dec.shape[0] == 0 or W_dec.shape[1] == 0:
        fail(f"W_dec: expected a tensor [n_latents, d], got {getattr(W_dec, 'shape', type(W_dec).__name__)}")
    if not bool(torch.isfinite(W_dec).all()):
        fail("W_dec: contains NaN or inf")
    n_pairs, max_sample = check_count("n_pairs", n_pairs), check_count("max_sample", max_sample, 0)
    if not (bin_width > 0 and np.isfinite(bin_width)):
        fail(f"bin_width: expected a positive number, got {bin_width!r}")
    ml = _mean_layers(mean_layer, W_dec.shape[0])
    live = np.flatnonzero(np.isfinite(ml))
    m = len(live)
    if m < 2:
        fail(f"mean_layer: need at least 2 live latents (non-null mean layer), got {m}")
    W = W_dec.detach().float().cpu()[torch.from_numpy(live)]
    norms = W.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        fail("W_dec: a live latent has an all-zero decoder row")
    W = W / norms

    gen = torch.Generator().manual_seed(int(seed))
    exhaustive = m * (m - 1) // 2 <= n_pairs
    if exhaustive:
        a, b = torch.triu_indices(m, m, offset=1)
    else:
        a = torch.randint(0, m, (n_pairs,), generator=gen)
        b = torch.randint(0, m - 1, (n_pairs,), generator=gen)
        b = b + (b >= a).long()  # uniform over j != i
    cos = torch.cat([(W[a[s:s + _CHUNK]] * W[b[s:s + _CHUNK]]).sum(1) for s in range(0, a.numel(), _CHUNK)])
    cos = cos.double().clamp(-1, 1).numpy()
    a, b = a.numpy(), b.numpy()
    dl = np.abs(ml[live[a]] - ml[live[b]])

    bin_id = np.floor(dl / bin_width).astype(np.int64)
    count = np.bincount(bin_id)
    s1 = np.bincount(bin_id, weights=cos)
    s2 = np.bincount(bin_id, weights=cos * cos)
    sa = np.bincount(bin_id, weights=np.abs(cos))
    nz = np.flatnonzero(count)
    c = count[nz]
    mean = s1[nz] / c
    bins = pa.table({
        "bin": pa.array(nz, pa.int64()),
        "dlayer_lo": pa.array(nz * bin_width, pa.float64()),
        "dlayer_hi": pa.array((nz + 1) * bin_width, pa.float64()),
        "n_pairs": pa.array(c, pa.int64()),
        "mean_cosine": pa.array(mean, pa.float64()),
        "std_cosine": pa.array(np.sqrt(np.maximum(s2[nz] / c - mean**2, 0.0)), pa.float64()),
        "mean_abs_cosine": pa.array(sa[nz] / c, pa.float64()),
    })

    keep = np.arange(len(cos))
    if len(cos) > max_sample:
        keep = np.sort(torch.randperm(len(cos), generator=gen)[:max_sample].numpy())
    sample = pa.table({
        "latent_a": pa.array(live[a[keep]], pa.int64()),
        "latent_b": pa.array(live[b[keep]], pa.int64()),
        "dlayer": pa.array(dl[keep], pa.float64()),
        "cosine": pa.array(cos[keep], pa.float64()),
    })
    corr = None
    if np.std(dl) > 0 and np.std(np.abs(cos)) > 0:
        corr = maybe(np.corrcoef(np.abs(cos), dl)[0, 1])
    summary = {
        "n_live": m, "n_pairs": int(len(cos)), "exhaustive": bool(exhaustive),
        "mean_cosine": float(cos.mean()), "mean_abs_cosine": float(np.abs(cos).mean()),
        "corr_abs_cosine_dlayer": corr,
    }
    return DecoderGeometry(bins, sample, summary)
