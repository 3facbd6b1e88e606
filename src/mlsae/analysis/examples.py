"""Max-activating examples per latent and layer, their context, DuckDB queries, prompt heatmaps.

Streaming with bounded memory: we keep at most ``n`` rows per (latent, layer) group. Each batch
first drops candidates that cannot beat their group's current n-th best, then the survivors
and the kept rows are sorted by (group, activation descending) and cut at rank n. Ties keep the
example seen first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_codes, check_count, check_layers, check_rows, fail

_FIELDS = ("act", "group", "window", "position", "token_id")
EXAMPLE_SCHEMA = pa.schema([
    ("latent", pa.int64()), ("layer", pa.int64()), ("rank", pa.int64()), ("activation", pa.float32()),
    ("window", pa.int64()), ("position", pa.int64()), ("token_id", pa.int64()),
])


class TopExamples:
    """Top-``n`` activations of every latent at every captured layer (``per_layer=False``: per latent).

    ``rank`` is 0 for the largest activation. With a per-layer SAE bank, (latent, layer) names
    latent ``latent`` of layer ``layer``'s dictionary, so the same class serves both.
    """

    def __init__(
        self, n_latents: int, layers: Sequence[int], n: int = 10, per_layer: bool = True,
        device: str | torch.device = "cpu",
    ):
        self.n_latents = check_count("n_latents", n_latents)
        self.layers = check_layers(layers)
        self.n = check_count("n", n)
        self.per_layer = bool(per_layer)
        self.device = torch.device(device)
        self.n_groups = self.n_latents * (len(self.layers) if self.per_layer else 1)
        # the n-th best activation of each full group (-inf while it has fewer than n rows)
        self.floor = torch.full((self.n_groups,), float("-inf"), device=self.device)  # [groups]
        self.kept = {f: torch.empty(0, dtype=torch.float32 if f == "act" else torch.int64, device=self.device) for f in _FIELDS}
        self.layer_of = torch.zeros(0, dtype=torch.int64, device=self.device)  # [kept] layer position

    def update(self, top_acts: Tensor, top_idx: Tensor, token_ids: Tensor, window: Tensor, position: Tensor) -> None:
        """Codes ``[tokens, layers, k]`` and per-row ``token_ids, window, position: [tokens]``."""
        check_codes(top_acts, top_idx, self.n_latents, len(self.layers))
        check_rows(top_acts.shape[0], token_ids=token_ids, window=window, position=position)
        top_acts, top_idx = top_acts.to(self.device), top_idx.to(self.device)
        L = len(self.layers)
        active = top_acts > 0
        tok, lpos, _ = active.nonzero(as_tuple=True)  # [N]
        act = top_acts[active].float()
        lat = top_idx[active].long()
        group = lat * L + lpos if self.per_layer else lat
        beats = act > self.floor[group]
        tok, lpos, act, group = tok[beats], lpos[beats], act[beats], group[beats]
        if act.numel() == 0:
            return
        new = {
            "act": act, "group": group, "window": window.to(self.device).long()[tok],
            "position": position.to(self.device).long()[tok], "token_id": token_ids.to(self.device).long()[tok],
        }
        cand = {f: torch.cat([self.kept[f], new[f]]) for f in _FIELDS}
        layer_of = torch.cat([self.layer_of, lpos])
        order = torch.argsort(cand["act"], descending=True, stable=True)
        order = order[torch.argsort(cand["group"][order], stable=True)]  # by group, then activation desc
        g = cand["group"][order]
        start = torch.ones_like(g, dtype=torch.bool)
        start[1:] = g[1:] != g[:-1]
        idx = torch.arange(g.numel(), device=self.device)
        rank = idx - idx[start][torch.cumsum(start, 0) - 1]
        keep = order[rank < self.n]
        self.kept = {f: cand[f][keep] for f in _FIELDS}
        self.layer_of = layer_of[keep]
        kept_rank = rank[rank < self.n]
        full = kept_rank == self.n - 1
        self.floor[self.kept["group"][full]] = self.kept["act"][full]

    def result(self) -> pa.Table:
        """Columns latent, layer (actual number), rank, activation, window, position, token_id;
        sorted by latent, layer, rank."""
        k = {f: t.cpu().numpy() for f, t in self.kept.items()}
        g = k["group"]
        latent = g // len(self.layers) if self.per_layer else g
        layer = np.asarray(self.layers, dtype=np.int64)[self.layer_of.cpu().numpy()]
        start = np.ones(len(g), dtype=bool)
        start[1:] = g[1:] != g[:-1]
        idx = np.arange(len(g))
        rank = idx - idx[start][np.cumsum(start) - 1] if len(g) else idx
        columns = [latent, layer, rank, k["act"], k["window"], k["position"], k["token_id"]]
        table = pa.table([pa.array(c, f.type) for c, f in zip(columns, EXAMPLE_SCHEMA)], schema=EXAMPLE_SCHEMA)
        return table.sort_by([("latent", "ascending"), ("layer", "ascending"), ("rank", "ascending")])


def attach_context(
    examples: pa.Table,
    windows: Tensor,
    decode: Optional[Callable[[list[int]], str]] = None,
    before: int = 16,
    after: int = 4,
) -> pa.Table:
    """Add each example's surrounding tokens from ``windows: [n_windows, ctx]``.

    New columns: ``context_ids`` (list of token ids, positions [position-before, position+after]
    clipped to the window), ``context_index`` (where the example token sits in it) and, when
    ``decode`` (token ids -> text) is given, ``text_before``, ``token_text``, ``text_after``.
    Decoding is a Python call per row: pass only the rows you will show.
    """
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.shape[1] == 0:
        fail(f"windows: expected a tensor [n_windows, ctx], got {getattr(windows, 'shape', type(windows).__name__)}")
    for name in ("window", "position", "token_id"):
        if name not in examples.column_names:
            fail(f"examples: expected a column {name!r} (a TopExamples.result() table)")
    w = np.asarray(examples.column("window").to_numpy(zero_copy_only=False), dtype=np.int64)
    p = np.asarray(examples.column("position").to_numpy(zero_copy_only=False), dtype=np.int64)
    t = np.asarray(examples.column("token_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    n_windows, ctx = windows.shape
    bad = (w < 0) | (w >= n_windows) | (p < 0) | (p >= ctx)
    if bad.any():
        i = int(np.argmax(bad))
        fail(f"examples: row {i} points at window {w[i]}, position {p[i]}, outside windows of shape {tuple(windows.shape)}")
    win = windows.cpu().numpy()
    if len(w) and not (win[w, p] == t).all():
        i = int(np.argmax(win[w, p] != t))
        fail(f"examples: row {i} has token_id {t[i]} but windows[{w[i]}, {p[i]}] is {win[w[i], p[i]]}: wrong windows?")
    lo, hi = np.maximum(p - before, 0), np.minimum(p + after + 1, ctx)
    ids = [win[wi, a:b].tolist() for wi, a, b in zip(w, lo, hi)]
    out = examples.append_column("context_ids", pa.array(ids, pa.list_(pa.int64())))
    out = out.append_column("context_index", pa.array(p - lo, pa.int64()))
    if decode is not None:
        offsets = p - lo
        out = out.append_column("text_before", pa.array([decode(c[:o]) for c, o in zip(ids, offsets)], pa.string()))
        out = out.append_column("token_text", pa.array([decode([c[o]]) for c, o in zip(ids, offsets)], pa.string()))
        out = out.append_column("text_after", pa.array([decode(c[o + 1:]) for c, o in zip(ids, offsets)], pa.string()))
    return out


def query_examples(parquet_path: str | Path, latent: int, layer: Optional[int] = None, limit: Optional[int] = None) -> list[dict]:
    """Rows of an examples Parquet file for one latent (and layer), ordered by layer then rank."""
    import duckdb

    path = Path(parquet_path)
    if not path.is_file():
        fail(f"parquet_path: no examples file at {path}")
    sql = "SELECT * FROM read_parquet(?) WHERE latent = ?"
    params: list = [str(path), int(latent)]
    if layer is not None:
        sql += " AND layer = ?"
        params.append(int(layer))
    sql += " ORDER BY layer, rank"
    if limit is not None:
        sql += f" LIMIT {check_count('limit', limit, 0)}"
    try:
        with duckdb.connect() as con:
            return con.execute(sql, params).fetch_arrow_table().to_pylist()
    except duckdb.Error as e:
        fail(f"parquet_path: cannot query {path} as an examples table ({str(e).splitlines()[0]})")


class Heatmap(NamedTuple):
    values: Tensor  # [len(latents), layers] float64
    latents: list[int]  # row order: most active first (total activation over the prompt)


def prompt_heatmap(
    top_acts: Tensor,
    top_idx: Tensor,
    n_latents: int,
    latents: Optional[Sequence[int]] = None,
    reduce: str = "max",
    n_top: int = 20,
) -> Heatmap:
    """Latents x layers activity for ONE prompt: codes ``[tokens, layers, k]`` of its tokens.

    ``reduce="max"``: each cell is the latent's largest activation at that layer over the
    prompt's tokens; ``"sum"``: the sum. Without ``latents``, rows are the ``n_top`` latents with
    the largest total activation (sum over tokens and layers), most active first; latents
    that never fire are left out. Assumes one shared dictionary (MLSAE).
    """
    n_latents = check_count("n_latents", n_latents)
    if not isinstance(top_acts, Tensor) or top_acts.ndim != 3:
        fail(f"top_acts: expected a tensor [tokens, layers, k], got {getattr(top_acts, 'shape', type(top_acts).__name__)}")
    check_codes(top_acts, top_idx, n_latents, top_acts.shape[1])
    if reduce not in ("max", "sum"):
        fail(f"reduce: expected 'max' or 'sum', got {reduce!r}")
    L = top_acts.shape[1]
    active = top_acts > 0
    _, lpos, _ = active.nonzero(as_tuple=True)
    act = top_acts[active].double()
    cell = top_idx[active].long().cpu() * L + lpos.cpu()
    act = act.cpu()
    dense_sum = torch.zeros(n_latents * L, dtype=torch.float64).index_add_(0, cell, act).view(n_latents, L)
    if reduce == "sum":
        dense = dense_sum
    else:
        dense = torch.zeros(n_latents * L, dtype=torch.float64).scatter_reduce_(0, cell, act, "amax").view(n_latents, L)
    if latents is None:
        total = dense_sum.sum(1)
        n_fired = int((total > 0).sum())
        order = torch.argsort(-total, stable=True)[: min(check_count("n_top", n_top, 0), n_fired)]
        rows = order.tolist()
    else:
        rows = [int(i) for i in latents]
        if any(i < 0 or i >= n_latents for i in rows):
            fail(f"latents: expected indices in [0, {n_latents}), got {rows}")
    return Heatmap(dense[rows] if rows else torch.zeros(0, L, dtype=torch.float64), rows)
