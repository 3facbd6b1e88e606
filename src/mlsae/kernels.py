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
tests check it against. On a GPU with the ``triton`` package, "triton" does the same gathers and
scatters with the kernels of :mod:`mlsae.triton_kernels`. "auto" picks per device at each call:
triton for CUDA tensors when it imported, else the fast CPU path probed at import (sparse, or
dense if this torch build cannot run it); ``MLSAE_KERNELS=sparse|dense|triton`` overrides it.
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

IMPLS = ("sparse", "dense", "triton")

try:  # the GPU kernels, when the triton package is installed
    from . import triton_kernels as _triton
except Exception:  # not installed, or no usable backend: the gather path serves every device
    _triton = None


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


_SCRATCH: dict[tuple, Tensor] = {}


def _scratch(rows: int, n: int, like: Tensor) -> Tensor:
    """A reused ``[rows, n]`` buffer for CPU pre-activations: a fresh one per call costs the OS
    zeroing its pages (a pass over memory as long as the matmul's output) every micro-batch."""
    key = (n, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _SCRATCH[key] = like.new_empty(rows, n)
    return buf[:rows]


def _pre_into(x: Tensor, W_enc: Tensor, b_enc: Tensor, out: Tensor) -> Tensor:
    """``_pre_acts`` written into ``out`` (no encoder bias, the MLSAE's case, skips adding zeros)."""
    if b_enc.requires_grad or bool(b_enc.any()):
        return torch.addmm(b_enc, x, W_enc.T, out=out)
    return torch.mm(x, W_enc.T, out=out)


def _pre_top(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """TopK of the pre-activations, ROW_BLOCK rows at a time (the same numbers as one pass:
    each row's matmul and TopK do not depend on the other rows) into a reused buffer on the CPU;
    the whole pre-activation matrix only when ``keep_pre``."""
    cpu_fast = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and x.dtype == W_enc.dtype
    if not cpu_fast or (x.shape[0] <= ROW_BLOCK and keep_pre):
        pre = _pre_acts(x, W_enc, b_enc)
        return (*_top(pre, k, relu), pre if keep_pre else None)
    acts = x.new_empty(x.shape[0], k)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    pre_all = x.new_empty(x.shape[0], W_enc.shape[0]) if keep_pre else None
    for i in range(0, x.shape[0], ROW_BLOCK):
        rows = min(ROW_BLOCK, x.shape[0] - i)
        pre = _pre_into(x[i : i + rows], W_enc, b_enc, _scratch(rows, W_enc.shape[0], x) if pre_all is None else pre_all[i : i + rows])
        acts[i : i + rows], idx[i : i + rows] = _top(pre, k, relu)
    return acts, idx, pre_all


def _bag(idx: Tensor, weight: Tensor, coef: Tensor) -> Tensor:
    """out[r] = sum_j coef[r, j] * weight[idx[r, j]]: one fused gather-scale-sum, no [N, k, d] temporary.
    In the weight's precision (under bf16 autocast the coefficients come from a bf16 matmul)."""
    return F.embedding_bag(idx, weight, per_sample_weights=coef.to(weight.dtype), mode="sum")


class _SparseTopKEncode(torch.autograd.Function):
    """TopK encoder whose backward touches only the k active latents of each row."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool, use_triton: bool = False):
        acts, idx, pre = _pre_top(x, W_enc, b_enc, k, keep_pre, relu)
        ctx.use_triton = use_triton
        ctx.save_for_backward(x, W_enc, acts, idx)
        ctx.mark_non_differentiable(idx, *([pre] if pre is not None else []))
        ctx.set_materialize_grads(False)  # else autograd hands backward a zero [N, n_latents] grad for pre
        return acts, idx, pre

    @staticmethod
    @once_differentiable
    def backward(ctx, g_acts: Tensor, _g_idx, _g_pre):
        if g_acts is None:
            return None, None, None, None, None, None, None
        x, W_enc, acts, idx = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        g = (g_acts * (acts > 0)).to(W_enc.dtype).contiguous()  # ReLU after TopK: clipped entries pass nothing
        # (without the ReLU here, the caller applies it, whose gradient is the same mask)
        grad_x = grad_W = grad_b = None
        if ctx.use_triton:
            grad_x = _triton.gather_sum(idx, W_enc.detach(), g) if need_x else None
            grad_W = _triton.scatter_rows(idx, g, x.to(W_enc.dtype), W_enc.shape[0]).to(W_enc.dtype) if need_W else None
        elif need_x or need_W:
            with torch.enable_grad():
                W = W_enc.detach().requires_grad_(need_W)
                gx = _bag(idx, W, g)  # grad_x[r] = sum_j g[r,j] W_enc[idx[r,j]]
                if need_W:  # transpose of the same gather: grad_W[i] = sum_{idx[r,j]=i} g[r,j] x[r]
                    (grad_W,) = torch.autograd.grad(gx, W, x.to(W.dtype))
            grad_x = gx.detach() if need_x else None
        if need_b:
            grad_b = torch.zeros_like(W_enc[:, 0]).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None


def _encode_sparse(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True):
    return _SparseTopKEncode.apply(x, W_enc, b_enc, k, keep_pre, relu)


def _encode_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True):
    return _SparseTopKEncode.apply(x, W_enc, b_enc, k, keep_pre, relu, True)


class _TritonDecode(torch.autograd.Function):
    """x_hat - b_pre = gather_sum(idx, W_dec, acts), with both gradients from the Triton kernels."""

    @staticmethod
    def forward(ctx, top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(top_acts, top_idx, W_dec)
        return _triton.gather_sum(top_idx, W_dec, top_acts.to(W_dec.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        acts, idx, W = ctx.saved_tensors
        g = g.contiguous()
        grad_acts = _triton.gather_dot(idx, g, W).to(acts.dtype) if ctx.needs_input_grad[0] else None
        grad_W = _triton.scatter_rows(idx, acts.to(torch.float32), g, W.shape[0]).to(W.dtype) if ctx.needs_input_grad[2] else None
        return grad_acts, None, grad_W


def _decode_triton(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    return _TritonDecode.apply(top_acts, top_idx, W_dec)


def _encode_dense(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, keep_pre: bool, relu: bool = True):
    pre = _pre_acts(x, W_enc, b_enc)
    acts, idx = _top(pre, k, relu)
    return acts, idx, pre.detach() if keep_pre else None


def _decode_sparse(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    return _bag(top_idx, W_dec, top_acts)


def _decode_dense(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor) -> Tensor:
    h = top_acts.new_zeros(top_acts.shape[0], W_dec.shape[0]).scatter_add(1, top_idx, top_acts)
    return h @ W_dec


_ENCODERS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "sparse": _encode_sparse, "dense": _encode_dense, "triton": _encode_triton}
_DECODERS: dict[str, Callable[..., Tensor]] = {"sparse": _decode_sparse, "dense": _decode_dense, "triton": _decode_triton}


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


def check_impl(name: str) -> str:
    """A kernel setting that can run here (``triton`` needs the package), unchanged: 'auto' stays
    'auto' so that each call picks for its tensors' device."""
    if name != "auto" and name not in IMPLS:
        raise MlsaeError(f"kernel impl {name!r} is not one of: auto, {', '.join(IMPLS)}")
    if name == "triton" and _triton is None:
        raise MlsaeError("kernel impl 'triton' needs the triton package (pip install triton) and a GPU")
    return name


def impl_for(name: str, device: torch.device) -> str:
    """The path a call on ``device`` takes: 'auto' is triton on CUDA when it imported, else the fast
    CPU path (``MLSAE_KERNELS`` overrides the choice); a named one is checked and kept."""
    if name == "auto":
        name = os.environ.get("MLSAE_KERNELS") or ("triton" if device.type == "cuda" and _triton is not None else FAST_IMPL)
    check_impl(name)
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MlsaeError(f"kernel impl 'triton' runs on a GPU (these tensors are on {device.type}; TRITON_INTERPRET=1 runs it "
                         f"slowly on the CPU, for tests)")
    return name


def resolve_impl(name: str) -> str:
    """The path ``name`` takes for CPU tensors ('auto' -> the fast path chosen at import)."""
    return impl_for(name, torch.device("cpu"))


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
    return _ENCODERS[impl_for(impl, x.device)](x, W_enc, b_enc, k, keep_pre, relu)


def sparse_decode(top_acts: Tensor, top_idx: Tensor, W_dec: Tensor, impl: str = "sparse") -> Tensor:
    """x_hat - b_pre: [N, d] = sum_j top_acts[:, j, None] * W_dec[top_idx[:, j]]; W_dec: [n_latents, d].

    Differentiable in top_acts and W_dec. Repeated indices in a row add up in both impls.
    """
    return _DECODERS[impl_for(impl, W_dec.device)](top_acts, top_idx, W_dec)
