"""Analyses of a joint (concatenated) coder, after Baskaran & Sklar's write-up.

Latent f's encoder and decoder rows split into one block per layer, enc_{f,l} and dec_{f,l}.

- **Banding**: the block norms ||enc_{f,l}|| and ||dec_{f,l}||; f's *trigger layer* is the one
  with the largest encoder block norm. Bucketed by trigger layer and sorted by activation rate,
  the norms show whether latents read at one layer and write to it and the layers after.
- **Decoder cosines**: cos(dec_{f,l}, dec_{f,l+k}) for every l, as a function of the gap k:
  mean and standard deviation over the most active latents, overall and per trigger bucket.
- **Information flow**: at a token where f fires, move the layer-l residual along dec_{f,l}
  and follow the model's own map to layer l+k at the real activations (a forward-mode
  Jacobian-vector product, c_{l,l+k,f}). Its cosine with dec_{f,l+k} says whether the decoder
  follows the model's local linear pathway; its *strength* c . dec_{f,l+k} / ||dec_{f,l+k}||^2
  is 1 when the move at l produces exactly dec_{f,l+k} along that direction. (The write-up
  prints the projection divided by the norm once; dividing by the squared norm makes perfect
  capture read 1, as its text says it should.) Everything is measured in the coder's space:
  the tangent dec_{f,l} is mapped to the model's units through the input transforms at that
  token, and the change at l+k back through them, both with the token's transform state held
  fixed (its per-layer scale), so a pathway that copies layer l to l+k unchanged reads 1.

Layer indices here are positions among the run's layers (k counts captured layers); tables
carry the actual layer numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import fail


def block_norms(W: Tensor, n_layers: int) -> Tensor:
    """``W: [latents, layers * d]`` -> ``[latents, layers]``: the norm of each layer's block of each row."""
    if W.dim() != 2 or W.shape[1] % n_layers:
        fail(f"W: expected [latents, {n_layers} x d], got shape {tuple(W.shape)}")
    return W.detach().view(W.shape[0], n_layers, -1).norm(dim=-1)


def layers_holding(share: Tensor, fraction: float = 0.9) -> Tensor:
    """``share: [latents, layers]`` (rows summing to 1) -> ``[latents]``: the fewest layers whose
    shares add up to at least ``fraction`` (how many layers carry most of a latent)."""
    ordered = share.sort(dim=1, descending=True).values.cumsum(1)
    return (ordered < fraction - 1e-9).sum(1) + 1


def joint_latents(enc_norms: Tensor, dec_norms: Tensor, n_tokens: Tensor, tokens_seen: int, layers: Sequence[int]) -> pa.Table:
    """One row per latent: trigger_layer (largest encoder block norm), n_tokens it fired at,
    activation_rate, active (fired at least once), dominant_decoder_layer and
    n_layers_90 (the fewest layers holding 90% of its decoder's squared norm)."""
    lay = np.asarray(layers, dtype=np.int64)
    sq = dec_norms.double().pow(2)
    share = sq / sq.sum(1, keepdim=True).clamp_min(1e-300)
    n_tok = n_tokens.cpu().numpy().astype(np.int64)
    return pa.table({
        "latent": pa.array(np.arange(enc_norms.shape[0]), pa.int64()),
        "trigger_layer": pa.array(lay[enc_norms.argmax(1).cpu().numpy()]),
        "dominant_decoder_layer": pa.array(lay[dec_norms.argmax(1).cpu().numpy()]),
        "n_layers_90": pa.array(layers_holding(share).cpu().numpy().astype(np.int64)),
        "n_tokens": pa.array(n_tok),
        "activation_rate": pa.array(n_tok / max(tokens_seen, 1), pa.float64()),
        "active": pa.array(n_tok > 0),
    })


def block_norm_table(enc_norms: Tensor, dec_norms: Tensor, layers: Sequence[int]) -> pa.Table:
    """Long format: latent, layer, enc_norm, dec_norm (one row per latent and layer)."""
    n, L = enc_norms.shape
    return pa.table({
        "latent": pa.array(np.repeat(np.arange(n), L), pa.int64()),
        "layer": pa.array(np.tile(np.asarray(layers, dtype=np.int64), n)),
        "enc_norm": pa.array(enc_norms.double().reshape(-1).cpu().numpy()),
        "dec_norm": pa.array(dec_norms.double().reshape(-1).cpu().numpy()),
    })


def most_active(latents: pa.Table, n: int, trigger_layer: Optional[int] = None) -> list[int]:
    """The ``n`` most active latents (by activation rate; never-active ones left out), optionally
    only those of one trigger bucket."""
    rate = np.asarray(latents.column("activation_rate").to_numpy())
    ok = np.asarray(latents.column("active").to_numpy(zero_copy_only=False))
    if trigger_layer is not None:
        ok = ok & (np.asarray(latents.column("trigger_layer").to_numpy()) == trigger_layer)
    idx = np.nonzero(ok)[0]
    return idx[np.argsort(-rate[idx], kind="stable")][:n].tolist()


def decoder_cosines(dec_blocks: Tensor, latents: pa.Table, layers: Sequence[int], top: int = 100) -> pa.Table:
    """cos(dec_{f,l}, dec_{f,l+k}) by gap k: mean and standard deviation over the ``top`` most
    active latents and every l, overall (trigger_layer null) and per trigger bucket (the ``top``
    most active of that bucket). Columns: trigger_layer, k, mean_cosine, std_cosine, n_latents, n_pairs."""
    L = len(layers)
    if dec_blocks.dim() != 3 or dec_blocks.shape[1] != L:
        fail(f"dec_blocks: expected [latents, {L}, d], got shape {tuple(dec_blocks.shape)}")
    unit = torch.nn.functional.normalize(dec_blocks.detach().double(), dim=-1)
    rows: dict[str, list] = {"trigger_layer": [], "k": [], "mean_cosine": [], "std_cosine": [], "n_latents": [], "n_pairs": []}
    for bucket in [None, *layers]:
        chosen = most_active(latents, top, bucket)
        if not chosen:
            continue
        u = unit[torch.tensor(chosen)]
        for k in range(1, L):
            cos = (u[:, :-k] * u[:, k:]).sum(-1).reshape(-1)  # every l with l + k in range
            rows["trigger_layer"].append(bucket)
            rows["k"].append(k)
            rows["mean_cosine"].append(float(cos.mean()))
            rows["std_cosine"].append(float(cos.std(unbiased=False)))
            rows["n_latents"].append(len(chosen))
            rows["n_pairs"].append(int(cos.numel()))
    return pa.table({
        "trigger_layer": pa.array(rows["trigger_layer"], pa.int64()),
        "k": pa.array(rows["k"], pa.int64()),
        "mean_cosine": pa.array(rows["mean_cosine"], pa.float64()),
        "std_cosine": pa.array(rows["std_cosine"], pa.float64()),
        "n_latents": pa.array(rows["n_latents"], pa.int64()),
        "n_pairs": pa.array(rows["n_pairs"], pa.int64()),
    })


# --------------------------------------------------------------------------------------------
# Information flow


@dataclass
class FlowItem:
    """A latent at one token: the token is position ``position`` of context ``window``."""

    latent: int
    window: int
    position: int
    activation: float


def flow_items(codes_acts: Tensor, codes_idx: Tensor, window: Tensor, position: Tensor, latents: Sequence[int], per_latent: int) -> list[FlowItem]:
    """For each latent, its ``per_latent`` largest activations among the coded tokens
    (``codes_*: [tokens, 1, k]`` joint codes; ``window, position: [tokens]``)."""
    acts, idx = codes_acts[:, 0], codes_idx[:, 0]
    items: list[FlowItem] = []
    for f in latents:
        hit = (idx == f) & (acts > 0)
        tok, slot = hit.nonzero(as_tuple=True)
        a = acts[tok, slot]
        best = torch.argsort(-a, stable=True)[:per_latent]
        items += [FlowItem(int(f), int(window[tok[b]]), int(position[tok[b]]), float(a[b])) for b in best]
    return items


def information_flow(
    residuals_from: Callable[[int, Tensor, Tensor, Sequence[int]], Tensor],
    transform: Callable[[Tensor], tuple[Tensor, object]],
    inverse_delta: Callable[[Tensor, object], Tensor],
    forward_delta: Callable[[Tensor, object], Tensor],
    dec_blocks: Tensor,
    layers: Sequence[int],
    ids: Tensor,
    resid: Tensor,
    items: Sequence[FlowItem],
    trigger: Optional[Tensor] = None,
    max_k: Optional[int] = None,
    batch: int = 16,
    progress: bool = True,
) -> pa.Table:
    """c_{l,l+k,f} for every item, every source layer l and gap k (up to ``max_k``).

    ``residuals_from(layer, residual, ids, later_layers)`` is the model's map from one block's
    output to later blocks' outputs (:meth:`ResidualModel.residuals_from`); ``transform``,
    ``inverse_delta`` and ``forward_delta`` are the coder's input transforms; ``dec_blocks: [latents, layers, d]`` in
    the coder's space; ``ids: [windows, pos]`` the contexts and ``resid: [windows, pos, layers, d]``
    their clean residuals. Each item runs on the prefix of its context up to its token (exact
    for a causal model), with the tangent at that token alone. Rows: latent, trigger_layer,
    layer_from, layer_to, k, window, position, activation, cosine, strength.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    L = len(layers)
    max_k = L - 1 if max_k is None else max_k
    if not 1 <= max_k <= L - 1:
        fail(f"max_k {max_k}: the run has {L} layers, so k can be 1 to {L - 1}")
    dec = dec_blocks.detach().to(resid.dtype)
    cols = {c: [] for c in ("latent", "layer_from", "layer_to", "k", "window", "position", "activation", "cosine", "strength")}
    ordered = sorted(items, key=lambda it: it.position)  # similar prefix lengths share a batch
    chunks = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
    with tqdm(total=(L - 1) * len(chunks), desc="information flow (JVPs)", disable=not progress or not chunks) as bar:
        for i in range(L - 1):
            later = list(range(i + 1, min(L, i + max_k + 1)))
            for chunk in chunks:
                B = len(chunk)
                w = torch.tensor([it.window for it in chunk])
                t = torch.tensor([it.position for it in chunk])
                f = torch.tensor([it.latent for it in chunk])
                T = int(t.max()) + 1
                rows = torch.arange(B)
                x_tok = resid[w, t]  # [B, L, d] clean, at the item's token
                _, state = transform(x_tok)
                tangent = torch.zeros_like(x_tok)
                tangent[:, i] = dec[f, i]
                v = torch.zeros_like(resid[w, :T, i])
                v[rows, t] = inverse_delta(tangent, state)[:, i]  # the move along dec_{f,l}, in the model's units
                with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no forward-mode derivative
                    _, d_out = torch.func.jvp(
                        lambda r: residuals_from(layers[i], r, ids[w, :T], [layers[j] for j in later]),
                        (resid[w, :T, i],), (v,),
                    )
                d_x = torch.zeros_like(x_tok)
                d_x[:, later] = d_out[rows, t]
                d_z = forward_delta(d_x, state)  # into the coder's space, the token's state held fixed
                for j in later:
                    c, target = d_z[:, j], dec[f, j]
                    cos = torch.nn.functional.cosine_similarity(c, target, dim=-1)
                    strength = (c * target).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)
                    cols["latent"] += f.tolist()
                    cols["layer_from"] += [layers[i]] * B
                    cols["layer_to"] += [layers[j]] * B
                    cols["k"] += [j - i] * B
                    cols["window"] += w.tolist()
                    cols["position"] += t.tolist()
                    cols["activation"] += [it.activation for it in chunk]
                    cols["cosine"] += cos.tolist()
                    cols["strength"] += strength.tolist()
                bar.update(1)
    lay = np.asarray(layers, dtype=np.int64)
    latent = np.asarray(cols["latent"], dtype=np.int64)
    trig = lay[trigger.cpu().numpy()[latent]] if trigger is not None and len(latent) else np.zeros(len(latent), np.int64)
    return pa.table({
        "latent": pa.array(latent, pa.int64()),
        "trigger_layer": pa.array(trig, pa.int64()) if trigger is not None else pa.nulls(len(latent), pa.int64()),
        **{c: pa.array(cols[c], pa.int64()) for c in ("layer_from", "layer_to", "k", "window", "position")},
        **{c: pa.array(cols[c], pa.float64()) for c in ("activation", "cosine", "strength")},
    })


def flow_by_bucket(flow: pa.Table) -> pa.Table:
    """Means of the flow per (trigger_layer, layer_from, layer_to, k): each latent's mean over its
    tokens first, then the mean over the bucket's latents (each latent counts once)."""
    keys = ["trigger_layer", "layer_from", "layer_to", "k"]
    if flow.num_rows == 0:
        return pa.table({c: pa.array([], pa.int64()) for c in keys})
    per_latent = flow.group_by(keys + ["latent"]).aggregate([("cosine", "mean"), ("strength", "mean"), ("cosine", "count")])
    out = per_latent.group_by(keys).aggregate(
        [("cosine_mean", "mean"), ("strength_mean", "mean"), ("cosine_count", "sum"), ("latent", "count")]
    )
    out = out.rename_columns(keys + ["mean_cosine", "mean_strength", "n_rows", "n_latents"])
    return out.sort_by([(k, "ascending") for k in keys])
