"""Input checks shared by the analyses: every bad batch fails with one clear MlsaeError line."""

from __future__ import annotations

from typing import NoReturn, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ..errors import MlsaeError


def fail(message: str) -> NoReturn:
    raise MlsaeError(message)


def check_layers(layers: Sequence[int]) -> list[int]:
    """Captured layer numbers: a non-empty, strictly increasing list of ints >= 0."""
    try:
        out = [int(l) for l in layers]
    except (TypeError, ValueError):
        fail(f"layers: expected a list of layer numbers, got {layers!r}")
    if not out or any(l < 0 for l in out) or any(b <= a for a, b in zip(out, out[1:])):
        fail(f"layers: expected a non-empty, strictly increasing list of layer numbers >= 0, got {out}")
    return out


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        fail(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _tensor(name: str, t, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        fail(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        fail(f"{name}: empty batch (0 tokens)")
    return t


def check_residual(x, n_layers: int, name: str = "x") -> Tensor:
    """``x: [tokens, layers, d]``, floating, finite, with one slot per captured layer."""
    x = _tensor(name, x, 3)
    if not x.is_floating_point():
        fail(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.shape[1] != n_layers:
        fail(f"{name}: expected {n_layers} layers in dimension 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        fail(f"{name}: contains NaN or inf")
    return x


def check_codes(top_acts, top_idx, n_latents: int, n_layers: int) -> None:
    """``top_acts, top_idx: [tokens, layers, k]``; acts finite and >= 0, indices in [0, n_latents)."""
    top_acts = _tensor("top_acts", top_acts, 3)
    top_idx = _tensor("top_idx", top_idx, 3)
    if top_acts.shape != top_idx.shape:
        fail(f"top_idx: expected the shape of top_acts {tuple(top_acts.shape)}, got {tuple(top_idx.shape)}")
    if top_acts.shape[1] != n_layers:
        fail(f"top_acts: expected {n_layers} layers in dimension 1, got shape {tuple(top_acts.shape)}")
    if top_acts.shape[2] == 0:
        fail("top_acts: expected k >= 1 codes per (token, layer), got 0")
    if not top_acts.is_floating_point():
        fail(f"top_acts: expected a floating-point tensor, got {top_acts.dtype}")
    if top_idx.is_floating_point() or top_idx.is_complex() or top_idx.dtype == torch.bool:
        fail(f"top_idx: expected an integer tensor, got {top_idx.dtype}")
    if not bool(torch.isfinite(top_acts).all()):
        fail("top_acts: contains NaN or inf")
    if bool((top_acts < 0).any()):
        fail("top_acts: expected activations >= 0 (zeros mean inactive)")
    lo, hi = int(top_idx.min()), int(top_idx.max())
    if lo < 0 or hi >= n_latents:
        fail(f"top_idx: expected latent indices in [0, {n_latents}), got values in [{lo}, {hi}]")


def check_rows(n_tokens: int, **columns) -> None:
    """Per-row integer tensors (token ids, window, position) of length ``n_tokens``, >= 0."""
    for name, t in columns.items():
        t = _tensor(name, t, 1)
        if t.is_floating_point() or t.dtype == torch.bool:
            fail(f"{name}: expected an integer tensor, got {t.dtype}")
        if t.shape[0] != n_tokens:
            fail(f"{name}: expected {n_tokens} rows (one per token of top_acts), got {t.shape[0]}")
        if int(t.min()) < 0:
            fail(f"{name}: expected values >= 0, got {int(t.min())}")


def float_column(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """float64 column with nulls where ``valid`` is False, so no NaN ever reaches a table."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(values)
    return pa.array(np.where(valid, values, 0.0), type=pa.float64(), mask=~valid)


def maybe(value: float) -> float | None:
    """A summary number, or None where it is undefined (never NaN)."""
    value = float(value)
    return value if np.isfinite(value) else None
