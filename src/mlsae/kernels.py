"""Fast paths of the TopK SAE: the encoder's TopK backward and the sparse decoder.

The SAE (DESIGN.md section 2) is  h = ReLU(TopK(W_enc (x - b_pre) + b_enc)),  x_hat = W_dec^T h + b_pre.
Only k of n_latents entries of h are non-zero, so anything after the encoder's dense matmul can be
done in O(N k d) instead of O(N n_latents d):

- decode: x_hat[r] = sum_j acts[r, j] * W_dec[idx[r, j]] is exactly ``embedding_bag(mode="sum")``
  with per-sample weights; its backward gives both grad_acts and grad_W_dec;
- encoder backward: with g = grad of top_acts (zero where ReLU clipped),
  grad_x[r] = sum_j g[r, j] W_enc[idx[r, j]] is the same decode with W_enc, and
  grad_W_enc[i] = sum_{(r, j): idx[r, j] = i} g[r, j] x[r] is that decode's weight gradient
  for the upstream gradient x, so it too comes from embedding_bag (no [N, n_latents] gradient).

Each path has a plain "dense" twin (autograd through topk/gather, a dense matmul decoder) that the
tests check it against. ``resolve_impl("auto")`` names the fast path chosen at import; a GPU
(Triton) path would be added to ``_ENCODERS``/``_DECODERS`` and chosen in ``_pick_fast``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mlsae.errors import MlsaeError

IMPLS = ("sparse", "dense")


def _pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """pre: [N, n_latents] = x W_enc^T + b_enc; shared by both paths so they pick the same latents."""
    return torch.addmm(b_enc, x, W_enc.T)


def _top(pre: Tensor, k: int, relu: bool = True) -> tuple[Tensor, Tensor]:
    """TopK then ReLU (the order of the paper). Order within a row is unspecified (sorted=False is faster)."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    return (vals.relu() if relu else vals), idx


ROW_BLOCK = int(os.environ.get("MLSAE_ENCODER_ROWS", "1024"))
"""Rows whose pre-activations the sparse encoder computes and reduces at once on CPU: the TopK then
reads them while they are still in cache, and the [N, n_latents] matrix is never held whole
(``MLSAE_ENCODER_ROWS`` overrides it; a huge value gives one pass)."""


def _pre_top(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """TopK of the pre-activations, ROW_BLOCK rows at a time (the same numbers as one pass:
    each row's matmul and TopK do not depend on the other rows); the whole pre-activation
    matrix only when ``keep_pre``."""
    if x.shape[0] <= ROW_BLOCK or x.device.type != "cpu":
        pre = _pre_acts(x, W_enc, b_enc)
        return (*_top(pre, k, relu), pre if keep_pre else None)
    acts = x.new_empty(x.shape[0], k)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    pre_all = x.new_empty(x.shape[0], W_enc.shape[0]) if keep_pre else None
    for i in range(0, x.shape[0], ROW_BLOCK):
        pre = _pre_acts(x[i : i + ROW_BLOCK], W_enc, b_enc)
        acts[i : i + ROW_BLOCK], idx[i : i + ROW_BLOCK] = _top(pre, k, relu)
        if pre_all is not None:
            pre_all[i : i + ROW_BLOCK] = pre
    return acts, idx, pre_all


def _bag(idx: Tensor, weight: Tensor, coef: Tensor) -> Tensor:
    """out[r] = sum_j coef[r, j] * weight[idx[r, j]]: one fused gather-scale-sum, no [N, k, d] temporary.
    In the weight's precision (under bf16 autocast the coefficients come from a bf16 matmul)."""
    return F.embedding_bag(idx, weight, per_sample_weights=coef.to(weight.dtype), mode="sum")


class _SparseTopKEncode(torch.autograd.Function):
    """TopK encoder whose backward touches only the k active latents of each row."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool):
        acts, idx, pre = _pre_top(x, W_enc, b_enc, k, keep_pre, relu)
        ctx.save_for_backward(x, W_enc, acts, idx)
        ctx.mark_non_differentiable(idx, *([pre] if pre is not None else []))
        ctx.set_materialize_grads(False)  # else autograd hands backward a zero [N, n_latents] grad for pre
        return acts, idx, pre

    @staticmethod
    @once_differentiable
    def backward(ctx, g_acts: Tensor, _g_idx, _g_pre):
        if g_acts is None:
            return None, None, None, None, None, None
        x, W_enc, acts, idx = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        g = (g_acts * (acts > 0)).to(W_enc.dtype).contiguous()  # ReLU after TopK: clipped entries pass nothing
        # (without the ReLU here, the caller applies it, whose gradient is the same mask)
        grad_x = grad_W = grad_b = None
        if need_x or need_W:
            with torch.enable_grad():
                W = W_enc.detach().requires_grad_(need_W)
                gx = _bag(idx, W, g)  # grad_x[r] = sum_j g[r,j] W_enc[idx[r,j]]
                if need_W:  # transpose of the same gather: grad_W[i] = sum_{idx[r,j]=i} g[r,j] x[r]
                    (grad_W,) = torch.autograd.grad(gx, W, x.to(W.dtype))
            grad_x = gx.detach() if need_x else None
        if need_b:
            grad_b = torch.zeros_like(W_enc[:, 0]).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None


def _encode_sparse(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True):
    return _SparseTopKEncode.apply(x, W_enc, b_enc, k, keep_pre, relu)


def _encode_dense(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True):
    pre = _pre_acts(x, W_enc, b_enc)
    acts, idx = _top(pre, k, relu)
    return acts, idx, pre.detach() if keep_pre else None


def _decode_sparse(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    return _bag(top_idx, W_dec, top_acts)


def _decode_dense(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    h = top_acts.new_zeros(top_acts.shape[0], W_dec.shape[0]).scatter_add(1, top_idx, top_acts)
    return h @ W_dec


_ENCODERS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {"sparse": _encode_sparse, "dense": _encode_dense}
_DECODERS: dict[str, Callable[..., Tensor]] = {"sparse": _decode_sparse, "dense": _decode_dense}


def _pick_fast() -> str:
    """Probe the sparse path once on a tiny input: if this torch build cannot run it, fall back to dense."""
    try:
        x = torch.randn(3, 4, requires_grad=True)
        W = torch.randn(5, 4, requires_grad=True)
        b = torch.zeros(5, requires_grad=True)
        acts, idx, _ = _encode_sparse(x, W, b, 2, False)
        _decode_sparse(acts, idx, W).sum().backward()
        ok = all(t.grad is not None for t in (x, W, b))
        return "sparse" if ok else "dense"
    except Exception:  # any failure here means "use the plain path", never a crash at import
        return "dense"


FAST_IMPL = _pick_fast()


def resolve_impl(name: str) -> str:
    """'auto' -> the fast path chosen at import; 'sparse'/'dense' pass through; anything else is an error."""
    if name == "auto":
        return FAST_IMPL
    if name in IMPLS:
        return name
    raise MlsaeError(f"kernel impl {name!r} is not one of: auto, {', '.join(IMPLS)}")


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, impl: str = "sparse", keep_pre: bool = True, relu: bool = True
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """TopK encoder (DESIGN.md section 2; MLSAE paper's TopK SAE).

    x: [N, d], already centred (x - b_pre); W_enc: [n_latents, d]; b_enc: [n_latents].
    Returns top_acts [N, k] (after ReLU), top_idx [N, k] int64 and pre_acts [N, n_latents]
    (detached; None unless ``keep_pre``: the sparse path then never holds that matrix whole).
    Gradients flow to x, W_enc and b_enc; impl "sparse" never builds an [N, n_latents] gradient.
    ``relu=False`` returns the top pre-activations themselves (a sharded dictionary compares
    them across processes before the ReLU, so that it picks the same latents).
    """
    if x.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise MlsaeError(f"topk_encode: x has shape {tuple(x.shape)}, expected [N, {W_enc.shape[1]}]")
    if not 1 <= k <= W_enc.shape[0]:
        raise MlsaeError(f"topk_encode: k={k} must be between 1 and n_latents={W_enc.shape[0]}")
    return _ENCODERS[resolve_impl(impl)](x, W_enc, b_enc, k, keep_pre, relu)


def sparse_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor, impl: str = "sparse") -> Tensor:
    """x_hat - b_pre: [N, d] = sum_j top_acts[:, j, None] * W_dec[top_idx[:, j]]; W_dec: [n_latents, d].

    Differentiable in top_acts and W_dec. Repeated indices in a row add up in both impls.
    """
    return _DECODERS[resolve_impl(impl)](top_acts, top_idx, W_dec)
