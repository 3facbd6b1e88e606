"""Triton kernels for the sparse parts of the TopK SAE step on a GPU (imported only when the
``triton`` package is installed; :mod:`mlsae.kernels` falls back to its gather path without it).

Every sparse operation of the step is one of two row-gather patterns over k indices per row:
- :func:`gather_sum`: out[r] = sum_j coef[r, j] * W[idx[r, j]]   (the decode; the encoder's input
  gradient with W_enc);
- its two gradients: :func:`gather_dot`, d coef[r, j] = <g[r], W[idx[r, j]]>, and
  :func:`scatter_rows`, d W[idx[r, j]] += coef[r, j] * v[r]   (the decoder's and encoder's
  weight gradients; atomic adds, so rows shared by many examples add up).
Each program handles one row and a block of the d columns, accumulating in fp32 whatever the
storage precision. ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 128


@triton.jit
def _gather_sum_kernel(idx_ptr, coef_ptr, w_ptr, out_ptr, K, D, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, K):
        i = tl.load(idx_ptr + r * K + j).to(tl.int64)
        c = tl.load(coef_ptr + r * K + j).to(tl.float32)
        acc += c * tl.load(w_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + cols, acc, mask=mask)


@triton.jit
def _gather_dot_kernel(idx_ptr, g_ptr, w_ptr, out_ptr, K, D, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.load(idx_ptr + r * K + j).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        g = tl.load(g_ptr + r.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += g * tl.load(w_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * K + j, tl.sum(acc, axis=0))


@triton.jit
def _scatter_rows_kernel(idx_ptr, coef_ptr, v_ptr, out_ptr, K, D, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    v = tl.load(v_ptr + r.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
    for j in range(0, K):
        i = tl.load(idx_ptr + r * K + j).to(tl.int64)
        c = tl.load(coef_ptr + r * K + j).to(tl.float32)
        tl.atomic_add(out_ptr + i * D + cols, c * v, mask=mask)


def _grid(rows: int, d: int) -> tuple[int, int]:
    return rows, triton.cdiv(d, BLOCK_D)


def gather_sum(idx: Tensor, W: Tensor, coef: Tensor) -> Tensor:
    """``[N, d]``: out[r] = sum_j coef[r, j] * W[idx[r, j]] (in W's precision, accumulated in fp32)."""
    n, k = idx.shape
    out = torch.empty(n, W.shape[1], dtype=torch.float32, device=W.device)
    if n:
        _gather_sum_kernel[_grid(n, W.shape[1])](idx.contiguous(), coef.contiguous(), W.contiguous(), out, k, W.shape[1],
                                                 BLOCK=BLOCK_D)
    return out.to(W.dtype)


def gather_dot(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """``[N, k]``: out[r, j] = <g[r], W[idx[r, j]]>."""
    n, k = idx.shape
    out = torch.empty(n, k, dtype=torch.float32, device=W.device)
    if n:
        _gather_dot_kernel[(n, k)](idx.contiguous(), g.contiguous(), W.contiguous(), out, k, W.shape[1], BLOCK=BLOCK_D)
    return out


def scatter_rows(idx: Tensor, coef: Tensor, v: Tensor, n_rows: int) -> Tensor:
    """``[n_rows, d]``: out[i] = sum over (r, j) with idx[r, j] = i of coef[r, j] * v[r]."""
    n, k = idx.shape
    out = torch.zeros(n_rows, v.shape[1], dtype=torch.float32, device=v.device)
    if n:
        _scatter_rows_kernel[_grid(n, v.shape[1])](idx.contiguous(), coef.contiguous(), v.contiguous(), out, k, v.shape[1],
                                                   BLOCK=BLOCK_D)
    return out
