"""What the explorer shows of one run, as plain data: no HTTP here.

A :class:`ServedRun` reads a run folder through :mod:`mlsae.runs` and its tables with DuckDB
(small tables copied into an in-memory database once; the large examples table queried in
place, one latent's row groups at a time), and answers the explorer's questions: the overview,
a page of the latent table, one latent, one prompt. The coder (for nearest latents and prompts)
and the language model (for prompts) are loaded on the first question that needs them.

Questions a run cannot answer raise :class:`Unanswerable` with an HTTP status and one line
saying why; the web layer passes both on.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import duckdb
import numpy as np
import pyarrow.parquet as pq
import torch

from ..analysis.histogram import bin_edges
from ..errors import MlsaeError
from ..runs import RunSpec, check_model, locate_run, open_run


class Unanswerable(Exception):
    """A question this run cannot answer: ``status`` (an HTTP 4xx/5xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


SORTABLE = {
    "latent": "latent", "mean_layer": "mean_layer", "layer_variance": "aggregated_variance",
    "per_token_variance": "per_token_variance", "variance_ratio": "variance_ratio", "activation_rate": "activation_rate",
    "n_tokens": "n_tokens", "n_layers_active": "n_layers_active", "trigger_layer": "trigger_layer",
    "dictionary_layer": "dictionary_layer",
}
"""Latent-table columns a request may sort or filter by (public name -> column)."""

RANGE_FILTERS = ("mean_layer", "layer_variance", "variance_ratio", "activation_rate")
EXAMPLES_PER_LAYER = 5
NEAREST = 10
HEATMAP_ROWS = 240  # live latents are binned into at most this many rows of the overview heatmap


def _rows(cursor) -> list[dict]:
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, (_clean(v) for v in row))) for row in cursor.fetchall()]


def _clean(v):
    """JSON-safe: NaN and inf become null (a table never holds them, but a division might)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class TokenText:
    """Token id -> text, decoded once per id (an example's context is shown token by token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        out = []
        for i in ids:
            text = self._memo.get(i)
            if text is None:
                text = self._memo[i] = self.tokenizer.decode([i])
            out.append(text)
        return out


class ModelShelf:
    """Language models and tokenizers by spec, loaded once on first use and shared by the runs
    that read them. A model is used by one request at a time (capturing hooks its blocks)."""

    def __init__(self, device: str = "cpu"):
        from ..model import resolve_device

        self.device = str(resolve_device(device))
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}
        self._in_use: dict[str, threading.Lock] = {}
        self._tokens: dict[str, TokenText] = {}

    @contextlib.contextmanager
    def using(self, spec: str) -> Iterator[Any]:
        """The model ``spec`` names, loaded if need be, held for this request alone."""
        from ..model import load_model

        with self._lock:
            in_use = self._in_use.setdefault(spec, threading.Lock())
        with in_use:
            if spec not in self._models:
                try:
                    self._models[spec] = load_model(spec, device=self.device)
                except MlsaeError as e:
                    raise Unanswerable(503, f"the run's model cannot be loaded here: {e}") from None
            yield self._models[spec]

    def tokens(self, spec: str) -> TokenText:
        from ..model import load_tokenizer

        with self._lock:
            if spec not in self._tokens:
                model = self._models.get(spec)
                try:
                    self._tokens[spec] = TokenText(model.tokenizer if model is not None else load_tokenizer(spec))
                except MlsaeError as e:
                    raise Unanswerable(503, f"the run's tokenizer cannot be loaded here: {e}") from None
            return self._tokens[spec]


class ServedRun:
    """One run folder, opened read-only for the explorer."""

    def __init__(self, name: str, folder: str | Path, shelf: ModelShelf):
        self.name = name
        self.folder = Path(folder)
        _, self.meta, _ = locate_run(self.folder)  # an unfinished run is refused with the line that says what to do
        self.shelf = shelf
        sae = self.meta["sae"]
        from ..sae import latent_space_of

        self.arch = sae["arch"]
        self.latent_space = latent_space_of(self.meta)
        self.layers: list[int] = list(self.meta["layers"])
        self.n_latents = int(self.meta["n_latents"])
        self.ctx = int(self.meta.get("train", {}).get("ctx") or 2048)
        self.tables = self.folder / "analysis"
        self._db = duckdb.connect()
        self._db.execute("SET enable_object_cache = true")  # the examples file's footer parsed once, not per latent
        self._lock = threading.Lock()
        self._run: Optional[RunSpec] = None  # the coder, loaded on first need
        self._model_checked = False
        self._decoders: Optional[list[torch.Tensor]] = None
        self._heatmap: Optional[dict] = None
        self.analysed = (self.tables / "latents.parquet").is_file() and (self.tables / "summary.json").is_file()
        if self.analysed:
            self.summary = json.loads((self.tables / "summary.json").read_text())
            self._load_tables()

    # ----------------------------------------------------------------------------------------
    # Tables

    def _table(self, name: str) -> Optional[Path]:
        path = self.tables / f"{name}.parquet"
        return path if path.is_file() else None

    def _load_tables(self) -> None:
        """Copy the per-latent tables into the in-memory database (small: a row or a few per latent and layer)."""
        db = self._db
        seen = max(int(self.summary.get("n_tokens") or 0), 1)
        joint = self._table("joint_latents")
        trigger = "j.trigger_layer" if joint else "CAST(NULL AS BIGINT)"
        join = f"LEFT JOIN read_parquet('{joint}') j USING (latent)" if joint else ""
        db.execute(
            f"CREATE TABLE latents AS SELECT l.*, l.n_tokens / {seen}::DOUBLE AS activation_rate, {trigger} AS trigger_layer "
            f"FROM read_parquet('{self._table('latents')}') l {join}"
        )
        db.execute(f"CREATE TABLE distribution AS SELECT * FROM read_parquet('{self._table('layer_distribution')}')")
        for name in ("block_norms", "histograms"):
            if self._table(name):
                db.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet('{self._table(name)}')")

    def _query(self, sql: str, params: list = ()) -> list[dict]:
        cursor = self._db.cursor()  # a cursor per call: the web layer asks from several threads
        try:
            return _rows(cursor.execute(sql, list(params)))
        finally:
            cursor.close()

    def _need_analysis(self) -> None:
        if not self.analysed:
            raise Unanswerable(404, f"run {self.name} has no analysis tables yet: run `mlsae analyze {self.folder} --data TEXT` to write them")

    def has(self, table: str) -> bool:
        cursor = self._db.cursor()
        try:
            return bool(cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0])
        finally:
            cursor.close()

    # ----------------------------------------------------------------------------------------
    # The overview

    def info(self) -> dict:
        train = self.meta.get("train", {})
        return {
            "name": self.name, "folder": str(self.folder), "arch": self.arch, "latent_space": self.latent_space,
            "model": self.meta.get("model"), "layers": self.layers, "n_latents": self.n_latents, "k": self.meta["sae"].get("k"),
            "train_tokens": train.get("tokens"), "data": train.get("data"), "ctx": self.ctx, "analysed": self.analysed,
            "evaluated": (self.folder / "eval.parquet").is_file(),
        }

    def evaluation(self) -> Optional[list[dict]]:
        path = self.folder / "eval.parquet"
        return [{k: _clean(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()] if path.is_file() else None

    def overview(self) -> dict:
        out = {"run": self.info(), "eval": self.evaluation(), "drift": None, "heatmap": None, "summary": None}
        if self.analysed:
            out["summary"] = {"n_tokens": self.summary.get("n_tokens"), "layers": self.summary.get("layers"),
                              "drift": self.summary.get("drift"), "joint": self.summary.get("joint")}
            drift = self._table("drift")
            out["drift"] = pq.read_table(drift).to_pylist() if drift else None
            out["heatmap"] = self.layer_heatmap()
        return out

    def layer_heatmap(self) -> dict:
        """Live latents sorted by mean layer, binned into at most ``HEATMAP_ROWS`` rows: each row the
        mean over its latents of p_i(l) / max_l p_i(l) (a latent's activation by layer, relative to its peak)."""
        with self._lock:
            if self._heatmap is None:
                self._heatmap = self._build_heatmap()
            return self._heatmap

    def _build_heatmap(self) -> dict:
        L = len(self.layers)
        cursor = self._db.cursor()
        try:
            live = cursor.execute("SELECT latent, coalesce(dictionary_layer, -1) AS d, mean_layer FROM latents WHERE NOT dead "
                                  "ORDER BY mean_layer, d, latent").fetchnumpy()
            dist = cursor.execute("SELECT latent, coalesce(dictionary_layer, -1) AS d, layer, probability FROM distribution").fetchnumpy()
        finally:
            cursor.close()
        n_live = len(live["latent"])
        if not n_live:
            return {"layers": self.layers, "rows": [], "latents_per_row": 0, "n_live": 0}
        position = np.full(max(self.layers) + 1, -1, dtype=np.int64)
        position[self.layers] = np.arange(L)

        def layer_pos(layer) -> np.ndarray:
            return position[np.asarray(layer, dtype=np.int64)]

        def keys(t) -> np.ndarray:  # a latent's index, plus its dictionary's position x n_latents in a per-layer bank
            d = np.asarray(t["d"], dtype=np.int64)
            return np.asarray(t["latent"], dtype=np.int64) + np.where(d >= 0, layer_pos(np.maximum(d, 0)), 0) * self.n_latents

        row_of = np.full(self.n_latents * (L if self.latent_space == "per_layer" else 1), -1, dtype=np.int64)
        row_of[keys(live)] = np.arange(n_live)
        rows, cols = row_of[keys(dist)], layer_pos(dist["layer"])
        keep = (rows >= 0) & (cols >= 0)
        grid = np.zeros((n_live, L))
        grid[rows[keep], cols[keep]] = np.asarray(dist["probability"], dtype=np.float64)[keep]
        grid /= np.maximum(grid.max(1, keepdims=True), 1e-12)
        mean_layer = np.asarray(live["mean_layer"], dtype=np.float64)
        per = max(1, math.ceil(n_live / HEATMAP_ROWS))
        starts = range(0, n_live, per)
        return {
            "layers": self.layers, "rows": [grid[i : i + per].mean(0).round(4).tolist() for i in starts],
            "mean_layer_lo": [float(mean_layer[i]) for i in starts],
            "mean_layer_hi": [float(mean_layer[min(i + per, n_live) - 1]) for i in starts],
            "latents_per_row": per, "n_live": n_live,
        }

    # ----------------------------------------------------------------------------------------
    # The latent table

    def latent_table(self, sort: str = "latent", descending: bool = False, offset: int = 0, limit: int = 50,
                     live_only: bool = False, ranges: Optional[dict[str, tuple[Optional[float], Optional[float]]]] = None,
                     trigger_layer: Optional[int] = None, dictionary_layer: Optional[int] = None) -> dict:
        """One page of the latent table, sorted and filtered; ``total`` counts every matching latent."""
        self._need_analysis()
        if sort not in SORTABLE:
            raise Unanswerable(422, f"sort {sort!r}: expected one of {', '.join(SORTABLE)}")
        where, params = [], []
        if live_only:
            where.append("NOT dead")
        for name, (lo, hi) in (ranges or {}).items():
            if name not in RANGE_FILTERS:
                raise Unanswerable(422, f"filter {name!r}: expected one of {', '.join(RANGE_FILTERS)}")
            for bound, op in ((lo, ">="), (hi, "<=")):
                if bound is not None:
                    where.append(f"{SORTABLE[name]} {op} ?")
                    params.append(float(bound))
        for value, column, space in ((trigger_layer, "trigger_layer", "joint"), (dictionary_layer, "dictionary_layer", "per_layer")):
            if value is not None:
                if self.latent_space != space:
                    raise Unanswerable(422, f"{column}: only a {'concat' if space == 'joint' else 'per-layer'} run has one; {self.name} is {self.arch}")
                where.append(f"{column} = ?")
                params.append(int(value))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self._query(f"SELECT count(*) AS n FROM latents {clause}", params)[0]["n"]
        order = f"{SORTABLE[sort]} {'DESC' if descending else 'ASC'} NULLS LAST, dictionary_layer, latent"
        rows = self._query(
            "SELECT latent, dictionary_layer, dead, n_tokens, activation_rate, mean_layer, aggregated_variance AS layer_variance, "
            "per_token_variance, variance_ratio, n_layers_active, trigger_layer "
            f"FROM latents {clause} ORDER BY {order} LIMIT ? OFFSET ?", [*params, int(limit), int(offset)],
        )
        return {"total": total, "offset": offset, "limit": limit, "sort": sort, "descending": descending, "rows": rows}

    # ----------------------------------------------------------------------------------------
    # One latent

    def check_latent(self, latent: int, layer: Optional[int]) -> Optional[int]:
        """The latent exists; for a per-layer bank, ``layer`` names its dictionary (returned)."""
        if not 0 <= latent < self.n_latents:
            raise Unanswerable(404, f"latent {latent} does not exist: run {self.name} has {self.n_latents:,} latents (0 to {self.n_latents - 1:,})")
        if self.latent_space == "per_layer":
            if layer is None:
                raise Unanswerable(422, f"run {self.name} has one dictionary per layer: name the latent's layer (?layer=, one of {self.layers})")
            if layer not in self.layers:
                raise Unanswerable(404, f"layer {layer}: run {self.name} has dictionaries at layers {self.layers}")
            return layer
        if layer is not None:
            raise Unanswerable(422, f"?layer= names a per-layer run's dictionary; {self.name} is {self.arch} (one dictionary)")
        return None

    def latent(self, latent: int, layer: Optional[int] = None, examples_per_layer: int = EXAMPLES_PER_LAYER) -> dict:
        self._need_analysis()
        d = self.check_latent(latent, layer)
        same = "latent = ? AND " + ("dictionary_layer = ?" if d is not None else "dictionary_layer IS NULL")
        key = [latent, d] if d is not None else [latent]
        stats = self._query(f"SELECT * FROM latents WHERE {same}", key)
        profile = self._query(f"SELECT layer, probability, activation_sum, n_firings FROM distribution WHERE {same} ORDER BY layer", key)
        blocks = (self._query("SELECT layer, enc_norm, dec_norm FROM block_norms WHERE latent = ? ORDER BY layer", [latent])
                  if self.has("block_norms") else None)
        histogram = self._histogram(same, key) if self.has("histograms") else None
        return {
            "run": self.name, "arch": self.arch, "latent_space": self.latent_space, "latent": latent, "dictionary_layer": d,
            "layers": self.layers, "stats": stats[0] if stats else None, "profile": profile, "block_norms": blocks,
            "histogram": histogram, "examples": self.examples(latent, d, examples_per_layer), "nearest": self.nearest(latent, d),
        }

    def _histogram(self, same: str, key: list) -> list[dict]:
        """The latent's bins from its lowest to its highest non-empty one, the empty ones between included."""
        rows = self._query(f"SELECT bin_lo, count FROM histograms WHERE {same} ORDER BY bin_lo", key)
        if not rows:
            return []
        edges = bin_edges()
        first, last = (int(np.argmin(np.abs(edges - rows[i]["bin_lo"]))) for i in (0, -1))
        counts = {int(np.argmin(np.abs(edges - r["bin_lo"]))): r["count"] for r in rows}
        return [{"bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]), "count": counts.get(b, 0)} for b in range(first, last + 1)]

    def examples(self, latent: int, layer: Optional[int], per_layer: int) -> list[dict]:
        """Top examples at each layer (a per-layer latent: its own layer), each token of the context decoded."""
        path = self._table("examples")
        if path is None:
            return []
        sql = "SELECT layer, rank, activation, context_ids, context_index FROM read_parquet(?) WHERE latent = ? AND rank < ?"
        params: list = [str(path), latent, per_layer]
        if layer is not None:
            sql += " AND layer = ?"
            params.append(layer)
        rows = self._query(sql + " ORDER BY layer, rank", params)
        tokens = self.shelf.tokens(self.meta["model"])
        for row in rows:
            row["tokens"] = tokens(row.pop("context_ids"))
        return rows

    def decoders(self) -> list[torch.Tensor]:
        """Each dictionary's decoder rows at unit norm (one for a shared or joint dictionary)."""
        coder = self.coder()
        with self._lock:
            if self._decoders is None:
                self._decoders = [torch.nn.functional.normalize(d.W_dec.detach().float().cpu(), dim=1) for d in coder.dictionaries()]
            return self._decoders

    def nearest(self, latent: int, layer: Optional[int], n: int = NEAREST) -> list[dict]:
        """The latents whose decoder rows have the largest cosine with this one's (same dictionary)."""
        W = self.decoders()[self.layers.index(layer) if layer is not None else 0]
        cos = W @ W[latent]
        cos[latent] = -float("inf")
        top = torch.topk(cos, min(n, len(cos) - 1))
        return [{"latent": int(i), "dictionary_layer": layer, "cosine": round(float(c), 4)} for c, i in zip(top.values, top.indices)]

    # ----------------------------------------------------------------------------------------
    # The live model: prompts

    def coder(self):
        with self._lock:
            if self._run is None:
                self._run = open_run(self.folder, self.shelf.device)
            return self._run.coder

    def prompt(self, text: str, top_per_cell: int = 5, heat_rows: int = 16) -> dict:
        """Codes of ``text`` at every (token, layer): the top latents there and, per token, a latents x layers heatmap."""
        from ..analysis import prompt_heatmap
        from ..analyze import code_prompt

        if not text.strip():
            raise Unanswerable(422, "text: expected some text to code, got an empty string")
        coder = self.coder()
        exclude_first = bool(self.meta.get("train", {}).get("exclude_first_position", True))
        with self.shelf.using(self.meta["model"]) as model:
            try:
                if not self._model_checked:
                    check_model(self._run, model)
                    self._model_checked = True
                codes = code_prompt(model, coder, text, self.ctx, exclude_first, what="text")
            except MlsaeError as e:
                raise Unanswerable(422, str(e)) from None
        L = len(self.layers)
        per_layer = self.latent_space == "per_layer"
        token_text = self.shelf.tokens(self.meta["model"])
        counted = codes.counted.tolist()
        rows = torch.arange(L)[:, None].expand(L, codes.latents.shape[-1])
        cells, heat = [], []
        for act, idx in zip(codes.activity, codes.latents):  # one counted token: [L, k] each
            order = torch.argsort(act, dim=1, descending=True)[:, :top_per_cell]
            a, i = act.gather(1, order), idx.gather(1, order)
            cells.append([[[int(x), round(float(v), 4)] for x, v in zip(ii, aa) if v > 0] for ii, aa in zip(i.tolist(), a.tolist())])
            key = idx.long() + (rows * self.n_latents if per_layer else 0)
            fired = act > 0
            keys, inverse = torch.unique(key[fired], return_inverse=True)
            grid = torch.zeros(len(keys), L).index_put_((inverse, rows[fired]), act[fired].float(), accumulate=True)
            best = torch.argsort(grid.sum(1), descending=True)[:heat_rows]
            heat.append({"latents": [self._latent_key(int(keys[b])) for b in best],
                         "values": grid[best].round(decimals=4).tolist()})
        overall = None
        if not per_layer:
            h = prompt_heatmap(codes.activity, codes.latents, self.n_latents, n_top=20)
            overall = {"latents": [{"latent": i, "layer": None} for i in h.latents], "values": h.values.round(decimals=4).tolist()}
        return {
            "run": self.name, "text": text, "layers": self.layers, "latent_space": self.latent_space,
            "tokens": token_text(codes.ids.tolist()), "counted": counted, "cells": cells, "heat": heat, "overall": overall,
        }

    def _latent_key(self, key: int) -> dict:
        if self.latent_space == "per_layer":
            return {"latent": key % self.n_latents, "layer": self.layers[key // self.n_latents]}
        return {"latent": key, "layer": None}
