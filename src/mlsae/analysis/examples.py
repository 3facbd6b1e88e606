"""Max-activating examples per latent and layer, their context, DuckDB queries, prompt heatmaps.

Streaming with bounded memory: at most ``n`` rows per (latent, layer) group are kept, in a
fixed slab of groups x n slots (about 24 bytes a slot: 265 MB for 36,864 latents x 30 layers
x 10). Ties keep the example seen first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from ._checks import check_codes, check_count, check_layers, check_rows, fail

_PAYLOAD = ("lpos", "window", "position", "token_id")
EXAMPLE_SCHEMA = pa.schema([
    ("latent", pa.int64()), ("layer", pa.int64()), ("rank", pa.int64()), ("activation", pa.float32()),
    ("window", pa.int64()), ("position", pa.int64()), ("token_id", pa.int64()),
])


_LOW = 0x7FFFFFFF  # low 31 bits of a sort key: _LOW - (bits of a float32 activation >= 0)


def _key(group: Tensor, act: Tensor) -> Tensor:
    """int64 key ordering by group, then activation DEScending (positive float32 bits are monotone)."""
    return (group << 31) | (_LOW - act.view(torch.int32).long())


def _activation(key: Tensor) -> Tensor:
    return (_LOW - (key & _LOW)).int().view(torch.float32)


class TopExamples:
    """Top-``n`` activations of every latent at every captured layer (``per_layer=False``: per latent).

    State is a slab of ``n`` sorted slots per group (empty slot = activation 0), so memory is
    bounded by groups x n. A batch keeps only candidates above their group's n-th slot, sorts
    them, and merges them into the slab (their merged rank = rank among the new + number of
    old slots at least as large, found by one searchsorted over the flat slab keys).
    ``rank`` is 0 for the largest activation; on exact ties the example seen first ranks first.
    With a per-layer SAE bank, (latent, layer) names latent ``latent`` of layer ``layer``'s
    dictionary, so the same class serves both arrangements.
    """

    def __init__(
        self, n_latents: int, layers: Sequence[int], n: int = 10, per_layer: bool = True,
        device: str | torch.device = "cpu",
    ):
        self.n_latents = check_count("n_latents", n_latents)
        self.layers = check_layers(layers)
        self.n = check_count("n", n)
        self.per_layer = bool(per_layer)
        self.device = dev = torch.device(device)
        self.n_groups = self.n_latents * (len(self.layers) if self.per_layer else 1)
        if self.n_groups >= 2**31:
            fail(f"n_latents: {self.n_latents} latents x {len(self.layers)} layers is too many groups (max 2^31)")
        empty = _key(torch.arange(self.n_groups, device=dev), torch.zeros(self.n_groups, device=dev))
        self.key = empty[:, None].repeat(1, self.n)  # [groups, n] ascending within and across rows
        self.slab = {f: torch.zeros(self.n_groups, self.n, dtype=torch.int32, device=dev) for f in _PAYLOAD}

    def update(self, top_acts: Tensor, top_idx: Tensor, token_ids: Tensor, window: Tensor, position: Tensor) -> None:
        """Codes ``[tokens, layers, k]`` and per-row ``token_ids, window, position: [tokens]``."""
        check_codes(top_acts, top_idx, self.n_latents, len(self.layers))
        check_rows(top_acts.shape[0], token_ids=token_ids, window=window, position=position)
        rows = {"window": window, "position": position, "token_id": token_ids}
        for name, t in rows.items():
            if int(t.max()) >= 2**31:
                fail(f"{name}: values must be < 2^31, got {int(t.max())}")
        T, L, k = top_acts.shape
        dev, n = self.device, self.n
        act = top_acts.to(dev, torch.float32).reshape(-1)  # [T*L*k]
        group = top_idx.to(dev).long()
        if self.per_layer:
            group = group * L + torch.arange(L, device=dev)[None, :, None]
        group = group.reshape(-1)
        # candidates above their group's n-th slot (0 while not full, so only active entries)
        floor = _activation(self.key[:, -1])
        flat = torch.nonzero(act > floor.index_select(0, group)).squeeze(1)  # [N]
        if flat.numel() == 0:
            return
        key, order = torch.sort(_key(group.index_select(0, flat), act.index_select(0, flat)), stable=True)
        g = key >> 31
        start = torch.ones_like(g, dtype=torch.bool)
        start[1:] = g[1:] != g[:-1]
        first = torch.nonzero(start).squeeze(1)
        rank = torch.arange(g.numel(), device=dev) - torch.repeat_interleave(first, torch.diff(first, append=first.new_tensor([g.numel()])))
        top = torch.nonzero(rank < n).squeeze(1)  # only the n best new ones per group can enter
        key, g, rank, order = key[top], g[top], rank[top], order[top]
        # merged rank: rank among the new + old slots with key <= this key (old first on ties)
        rank += torch.searchsorted(self.key.view(-1), key, right=True) - g * n
        put = torch.nonzero(rank < n).squeeze(1)  # [P] new entries that enter
        if put.numel() == 0:
            return
        key, g, rank, src = key[put], g[put], rank[put], flat.index_select(0, order.index_select(0, put))
        touched, row = torch.unique_consecutive(g, return_inverse=True)  # [G], [P]
        taken = torch.zeros(touched.numel(), n, dtype=torch.bool, device=dev)
        taken[row, rank] = True
        old_slot = (torch.cumsum(~taken, 1) - 1).clamp_(min=0)  # free slot j takes old entry j
        new_key = self.key.index_select(0, touched).gather(1, old_slot)
        new_key[row, rank] = key
        self.key[touched] = new_key
        tok = src // (L * k)
        values = {f: rows[f].to(dev).index_select(0, tok).int() for f in rows}
        values["lpos"] = ((src // k) % L).int()
        for f in _PAYLOAD:
            slab = self.slab[f].index_select(0, touched).gather(1, old_slot)
            slab[row, rank] = values[f]
            self.slab[f][touched] = slab

    def absorb(self, keys: Sequence[Tensor], slabs: Sequence[dict[str, Tensor]]) -> None:
        """Keep the top n of every group over several accumulators' states (``key``, ``slab``) of
        disjoint sets of tokens (read by different processes). On exact ties the example earlier
        in the text (window, then position) ranks first, as one process reading it all ranks them."""
        key = torch.cat(list(keys), 1)
        slab = {f: torch.cat([s[f] for s in slabs], 1) for f in _PAYLOAD}
        where = slab["window"].long() * 2**31 + slab["position"].long()
        by_place = where.argsort(dim=1, stable=True)
        key = key.gather(1, by_place)
        key, order = key.sort(dim=1, stable=True)
        keep = by_place.gather(1, order[:, : self.n])
        self.key = key[:, : self.n].contiguous()
        self.slab = {f: v.gather(1, keep).contiguous() for f, v in slab.items()}

    def result(self) -> pa.Table:
        """Columns latent, layer (actual number), rank, activation, window, position, token_id;
        sorted by latent, layer, rank."""
        act = _activation(self.key)
        filled = act > 0
        g, rank = torch.nonzero(filled, as_tuple=True)  # row-major: by group, then rank
        p = {f: self.slab[f][filled].cpu().numpy().astype(np.int64) for f in _PAYLOAD}
        g = g.cpu().numpy()
        latent = g // len(self.layers) if self.per_layer else g
        layer = np.asarray(self.layers, dtype=np.int64)[p["lpos"]]
        columns = [latent, layer, rank.cpu().numpy(), act[filled].cpu().numpy(), p["window"], p["position"], p["token_id"]]
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
            cursor = con.execute(sql, params)
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
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
