"""Layer distribution of every latent (Lawson et al. 2025, Sec. 4.2-4.3, Figs. 2-4).

For latent i, p_i(l) is proportional to the sum of its activations at layer l. We report its
mean and variance over l (AGGREGATED over all tokens), and the PER-TOKEN variance: for each
token where i fires at >= 1 layer, the variance over layers of that token's activations
(normalised to sum to 1 for that token), averaged over those tokens only (tokens where it is
inactive are not counted as zeros). Their ratio is the paper's headline number.

Conventions:
- l is the ACTUAL layer number (from ``layers``), not its index among the captured layers.
- ``shared_dictionary=True`` (MLSAE): ``top_idx`` is one global latent index at every layer.
  ``False`` (per-layer SAE bank): each layer has its own dictionary, so latent (layer, i) is
  a separate latent that lives at one layer by construction (variances 0, ratio null).
- A latent that never fires in the analysed tokens is "dead": its statistics are null.
- ``variance_ratio`` is null when the latent is dead or its per-token variance is 0 (the
  ratio is undefined or infinite there); no table ever holds NaN or inf.

Paper definition (Lawson et al.'s code), reported beside ours in ``summary()`` under keys
ending in ``_paper``: per token and latent, q_ti(l) = a_ti(l) / sum_l a_ti(l) (all zero where
i is inactive at t). Aggregated: Q_i(l) = mean over ALL tokens of q_ti(l), which sums to the
firing rate r_i rather than 1, and V_i = sum_l l^2 Q_i(l) - (sum_l l Q_i(l))^2, averaged over
all latents; it carries an r_i (1 - r_i) mean_layer^2 term. Per token: the variance over l of
q_ti, averaged over ALL (token, latent) pairs, inactive pairs counting 0. Their ratio is
therefore much larger than ours on the same codes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_codes, check_count, check_layers, float_column, maybe
from .joint import layers_holding


class LayerDistribution:
    """Streaming per-latent layer statistics from sparse codes ``[tokens, layers, k]``."""

    SUMMED = ("act_sum", "fire_count", "n_tokens", "pt_var_sum", "pt_layers_sum", "pt_multi", "pt_hist", "q_sum",
              "token_frac_sum", "tokens_with_codes", "tokens_seen")
    """The state, all sums over tokens: accumulators of disjoint tokens add up to the accumulator of all."""

    def __init__(
        self,
        n_latents: int,
        layers: Sequence[int],
        shared_dictionary: bool = True,
        device: str | torch.device = "cpu",
    ):
        self.n_latents = check_count("n_latents", n_latents)
        self.layers = check_layers(layers)
        self.shared = bool(shared_dictionary)
        L = len(self.layers)
        self.n_total = self.n_latents * (1 if self.shared else L)  # rows of the per-latent state
        dev = self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        self.layer_value = torch.tensor(self.layers, **f64)  # [L] actual layer numbers
        # aggregated, per (latent, layer)
        self.act_sum = torch.zeros(self.n_total, L, **f64)  # sum of activations
        self.fire_count = torch.zeros(self.n_total, L, **i64)  # number of (token) firings
        # per token, summed over the tokens where the latent fires
        self.n_tokens = torch.zeros(self.n_total, **i64)  # tokens where it fires at >= 1 layer
        self.pt_var_sum = torch.zeros(self.n_total, **f64)  # sum of per-token variances
        self.pt_layers_sum = torch.zeros(self.n_total, **i64)  # sum of #layers active per token
        self.pt_multi = torch.zeros(self.n_total, **i64)  # tokens where it fires at > 1 layer
        self.pt_hist = torch.zeros(L + 1, **i64)  # (token, latent) pairs by #layers active
        self.q_sum = torch.zeros(self.n_total, L, **f64)  # paper definition: sum over tokens of q_ti(l)
        self.token_frac_sum = 0.0  # sum over tokens of the fraction of its latents at > 1 layer
        self.tokens_with_codes = 0
        self.tokens_seen = 0

    def update(self, top_acts: Tensor, top_idx: Tensor) -> None:
        """``top_acts: [tokens, layers, k]`` (>= 0, 0 = inactive), ``top_idx``: latent indices.

        Per-token grouping without a dense [tokens, latents] array: sort each token's L*k
        latent ids (a short row sort), so a (token, latent) pair's entries are contiguous.
        Assumes the indices at one (token, layer) are distinct, as TopK guarantees.
        """
        check_codes(top_acts, top_idx, self.n_latents, len(self.layers))
        T, L, k = top_acts.shape
        M = L * k
        dev = self.device
        acts = top_acts.to(dev, torch.float32)
        lat = top_idx.to(dev).long()
        lpos = torch.arange(L, device=dev)[None, :, None]  # [1, L, 1]
        if not self.shared:
            lat = lpos * self.n_latents + lat
        active = acts > 0
        self.tokens_seen += T

        # aggregated: per (latent, layer) sums; inactive entries add 0 activation and 0 firings
        cell = (lat * L + lpos).reshape(-1)
        self.act_sum.view(-1).index_add_(0, cell, acts.reshape(-1).double())
        self.fire_count.view(-1).index_add_(0, cell, active.reshape(-1).long())

        # per token: inactive entries get the id n_total, so they sort last into a discarded pair
        sentinel = self.n_total
        key = torch.where(active, lat, sentinel).view(T, M)
        key = key.int() if sentinel < 2**31 - 1 else key
        sorted_lat, perm = torch.sort(key, dim=1)  # [T, M] each
        a = acts.view(T, M).gather(1, perm).double().view(-1)  # [T*M]
        centred = self.layer_value - self.layer_value.mean()  # [L] centred layer numbers: less cancellation
        lv = centred.index_select(0, (perm // k).view(-1))  # [T*M]
        is_start = torch.ones(T, M, dtype=torch.bool, device=dev)
        is_start[:, 1:] = sorted_lat[:, 1:] != sorted_lat[:, :-1]
        is_start = is_start.view(-1)
        pid = torch.cumsum(is_start, 0) - 1  # [T*M] pair id of each entry
        first = torch.nonzero(is_start).squeeze(1)  # [P] flat index of each pair's first entry
        P = first.numel()
        s0 = torch.zeros(P, dtype=torch.float64, device=dev).index_add_(0, pid, a)
        a_lv = a * lv
        s1 = torch.zeros_like(s0).index_add_(0, pid, a_lv)
        s2 = torch.zeros_like(s0).index_add_(0, pid, a_lv * lv)
        n_layers = torch.diff(first, append=first.new_tensor([T * M]))  # [P] entries = layers active
        # paper definition: each active entry's share q_ti(l) of its (token, latent) pair's total
        entry_lat = sorted_lat.view(-1).long()
        entry_live = torch.nonzero(entry_lat != sentinel).squeeze(1)
        q = a.index_select(0, entry_live) / s0.index_select(0, pid.index_select(0, entry_live))
        q_cell = entry_lat.index_select(0, entry_live) * L + (perm.view(-1).index_select(0, entry_live) // k)
        self.q_sum.view(-1).index_add_(0, q_cell, q)
        pair_lat = sorted_lat.view(-1).index_select(0, first).long()
        live = torch.nonzero(pair_lat != sentinel).squeeze(1)  # drop the inactive entries' pairs
        if live.numel() == 0:
            return
        s0, s1, s2, n_layers, pair_lat, first = (t.index_select(0, live) for t in (s0, s1, s2, n_layers, pair_lat, first))
        pair_tok = first // M
        mean = s1 / s0
        multi = n_layers > 1
        var = torch.where(multi, (s2 / s0 - mean * mean).clamp_min_(0.0), 0.0)  # [P] exact 0 at one layer
        w_multi = multi.double()

        self.n_tokens.add_(torch.bincount(pair_lat, minlength=self.n_total))
        self.pt_var_sum.index_add_(0, pair_lat, var)
        self.pt_layers_sum.index_add_(0, pair_lat, n_layers)
        self.pt_multi.add_(torch.bincount(pair_lat, weights=w_multi, minlength=self.n_total).round().long())
        self.pt_hist.add_(torch.bincount(n_layers.clamp(max=L), minlength=L + 1))
        per_tok = torch.bincount(pair_tok, minlength=T).double()
        per_tok_multi = torch.bincount(pair_tok, weights=w_multi, minlength=T)
        has = per_tok > 0
        self.token_frac_sum += float((per_tok_multi / per_tok.clamp_min(1)).sum())
        self.tokens_with_codes += int(has.sum())

    # ---- derived per-latent statistics (tensors; NaN marks undefined, never written to tables)

    def probabilities(self) -> Tensor:
        """``[latents, layers]`` aggregated p_i(l); rows of dead latents are all 0."""
        total = self.act_sum.sum(1, keepdim=True)
        return torch.where(total > 0, self.act_sum / total.clamp_min(1e-300), torch.zeros_like(self.act_sum))

    def mean_layer(self) -> Tensor:
        """``[latents]`` aggregated mean layer number; NaN for dead latents."""
        p = self.probabilities()
        return torch.where(self.n_tokens > 0, p @ self.layer_value, torch.full_like(p[:, 0], float("nan")))

    def _stats(self) -> dict[str, np.ndarray]:
        p = self.probabilities()
        live = self.n_tokens > 0
        mean = p @ self.layer_value
        agg_var = (p * (self.layer_value[None, :] - mean[:, None]) ** 2).sum(1)
        n = self.n_tokens.clamp_min(1).double()
        pt_var = self.pt_var_sum / n
        out = dict(
            live=live, mean=mean, agg_var=agg_var, pt_var=pt_var,
            ratio=agg_var / pt_var.where(pt_var > 0, torch.ones_like(pt_var)),
            ratio_ok=live & (pt_var > 0),
            layers_agg=(self.act_sum > 0).sum(1),
            layers_pt=self.pt_layers_sum / n,
            multi_frac=self.pt_multi / n,
        )
        return {k: v.cpu().numpy() for k, v in out.items()}

    def result(self) -> dict[str, pa.Table]:
        """Three tables (nulls where undefined, never NaN):

        ``latents``, one row per latent: latent, dictionary_layer (null for a shared dictionary),
        dead, n_tokens (tokens where it fires), n_firings ((token, layer) activations),
        activation_sum, mean_layer, aggregated_variance, per_token_variance, variance_ratio
        (aggregated / per-token), n_layers_active (layers with nonzero total activation),
        n_layers_90 (the fewest layers holding 90% of its total activation), mean_layers_per_token,
        multi_layer_token_fraction (share of its tokens with > 1 layer).
        ``layer_distribution``, one row per (latent, layer) where it fired (missing rows = 0):
        latent, dictionary_layer, layer, activation_sum, probability (p_i(l)), n_firings.
        ``n_layers``, one row per n = 1..L: n_layers, per_token_count / per_token_fraction
        ((token, latent) pairs active at exactly n layers), aggregated_count /
        aggregated_fraction (live latents with nonzero total activation at exactly n layers).
        """
        s = self._stats()
        live = s["live"]
        L = len(self.layers)
        ids = np.arange(self.n_total)
        latent = ids % self.n_latents
        if self.shared:
            dict_layer = pa.nulls(self.n_total, pa.int64())
        else:
            dict_layer = pa.array(np.asarray(self.layers, dtype=np.int64)[ids // self.n_latents])
        act_total = self.act_sum.sum(1).cpu().numpy()
        share = self.act_sum / self.act_sum.sum(1, keepdim=True).clamp_min(1e-300)
        n_layers_90 = layers_holding(share).cpu().numpy().astype(np.int64)
        latents = pa.table({
            "latent": pa.array(latent, pa.int64()),
            "dictionary_layer": dict_layer,
            "dead": pa.array(~live),
            "n_tokens": pa.array(self.n_tokens.cpu().numpy(), pa.int64()),
            "n_firings": pa.array(self.fire_count.sum(1).cpu().numpy(), pa.int64()),
            "activation_sum": pa.array(act_total, pa.float64()),
            "mean_layer": float_column(s["mean"], live),
            "aggregated_variance": float_column(s["agg_var"], live),
            "per_token_variance": float_column(s["pt_var"], live),
            "variance_ratio": float_column(s["ratio"], s["ratio_ok"]),
            "n_layers_active": pa.array(s["layers_agg"], pa.int64()),
            "n_layers_90": pa.array(n_layers_90, pa.int64(), mask=~live),
            "mean_layers_per_token": float_column(s["layers_pt"], live),
            "multi_layer_token_fraction": float_column(s["multi_frac"], live),
        })

        fires = self.fire_count.cpu().numpy()
        row, col = np.nonzero(fires)  # only (latent, layer) cells where it fired
        probs = self.probabilities().cpu().numpy()
        distribution = pa.table({
            "latent": pa.array(row % self.n_latents, pa.int64()),
            "dictionary_layer": dict_layer.take(pa.array(row)) if not self.shared else pa.nulls(len(row), pa.int64()),
            "layer": pa.array(np.asarray(self.layers, dtype=np.int64)[col]),
            "activation_sum": pa.array(self.act_sum.cpu().numpy()[row, col], pa.float64()),
            "probability": pa.array(probs[row, col], pa.float64()),
            "n_firings": pa.array(fires[row, col], pa.int64()),
        })

        pt = self.pt_hist.cpu().numpy()[1:]  # [L] pairs active at 1..L layers
        agg = np.bincount(s["layers_agg"][live], minlength=L + 1)[1:]
        n_layers = pa.table({
            "n_layers": pa.array(np.arange(1, L + 1), pa.int64()),
            "per_token_count": pa.array(pt, pa.int64()),
            "per_token_fraction": float_column(pt / max(pt.sum(), 1), np.full(L, pt.sum() > 0)),
            "aggregated_count": pa.array(agg, pa.int64()),
            "aggregated_fraction": float_column(agg / max(agg.sum(), 1), np.full(L, agg.sum() > 0)),
        })
        return {"latents": latents, "layer_distribution": distribution, "n_layers": n_layers}

    def paper_summary(self) -> dict:
        """The aggregated and per-token variances and their ratio by the paper's definition."""
        if self.tokens_seen == 0:
            return {"mean_aggregated_variance_paper": None, "mean_per_token_variance_paper": None, "variance_ratio_paper": None}
        Q = self.q_sum / self.tokens_seen  # [latents, layers]; row i sums to i's firing rate
        lv = self.layer_value
        agg = (Q * lv**2).sum(1) - (Q @ lv) ** 2  # [latents]
        mean_agg = float(agg.mean())
        mean_pt = float(self.pt_var_sum.sum()) / (self.tokens_seen * self.n_total)
        return {
            "mean_aggregated_variance_paper": maybe(mean_agg),
            "mean_per_token_variance_paper": maybe(mean_pt),
            "variance_ratio_paper": maybe(mean_agg / mean_pt) if mean_pt > 0 else None,
        }

    def summary(self) -> dict:
        """Headline numbers; None where undefined (e.g. no latent ever fired)."""
        s = self._stats()
        live = s["live"]
        n_live = int(live.sum())
        mean_agg = s["agg_var"][live].mean() if n_live else np.nan
        mean_pt = s["pt_var"][live].mean() if n_live else np.nan
        ratios = s["ratio"][s["ratio_ok"]]
        pt = self.pt_hist.cpu().numpy()
        paper = self.paper_summary()
        return {
            **paper,
            "n_latents": self.n_total,
            "n_live": n_live,
            "n_dead": self.n_total - n_live,
            "dead_fraction": (self.n_total - n_live) / self.n_total,
            "n_tokens": self.tokens_seen,
            "mean_aggregated_variance": maybe(mean_agg),
            "mean_per_token_variance": maybe(mean_pt),
            # mean over live latents of aggregated variance / mean over live latents of per-token variance
            "variance_ratio": maybe(mean_agg / mean_pt) if n_live and mean_pt > 0 else None,
            "median_variance_ratio": maybe(np.median(ratios)) if ratios.size else None,
            "n_latents_with_ratio": int(ratios.size),
            # fraction of live latents with nonzero total activation at > 1 layer
            "multi_layer_fraction_aggregated": maybe((s["layers_agg"][live] > 1).mean()) if n_live else None,
            # per token: fraction of the latents active at that token that are active at > 1 layer, averaged over tokens
            "multi_layer_fraction_per_token": maybe(self.token_frac_sum / self.tokens_with_codes) if self.tokens_with_codes else None,
            # over all (token, latent) pairs with the latent active
            "multi_layer_fraction_pooled": maybe(pt[2:].sum() / pt.sum()) if pt.sum() else None,
            "mean_layers_active_per_token": maybe((pt * np.arange(len(pt))).sum() / pt.sum()) if pt.sum() else None,
            "mean_layers_active_aggregated": maybe(s["layers_agg"][live].mean()) if n_live else None,
        }
