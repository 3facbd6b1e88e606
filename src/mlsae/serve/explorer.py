"""What the explorer shows of one run, as plain data: no HTTP here.

A :class:`ServedRun` reads a run folder through :mod:`mlsae.runs` and its tables with DuckDB
(the per-latent tables copied into an in-memory database once) and pyarrow (the large examples
table read in place, one latent's row groups at a time), and answers the explorer's questions: the overview,
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
import pyarrow.compute as pc
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
    """Token id -> its text as it reads inside a text, decoded once per id.

    A token alone can decode without the space it carries (SentencePiece drops a leading one),
    so each is decoded after a fixed anchor token and the anchor's own text taken off."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}
        anchor = tokenizer("a", add_special_tokens=False).input_ids
        self._anchor = anchor[:1]
        self._anchor_text = tokenizer.decode(self._anchor) if anchor else ""

    def one(self, i: int) -> str:
        text = self._memo.get(i)
        if text is None:
            both = self.tokenizer.decode(self._anchor + [i]) if self._anchor else ""
            text = both[len(self._anchor_text):] if self._anchor and both.startswith(self._anchor_text) else self.tokenizer.decode([i])
            self._memo[i] = text
        return text

    def __call__(self, ids) -> list[str]:
        return [self.one(int(i)) for i in ids]


class ModelShelf:
    """Language models and tokenizers by spec, loaded once on first use and shared by the runs
    that read them. A model is used by one request at a time (capturing hooks its blocks); a
    tokenizer that cannot be loaded is not tried again."""

    def __init__(self, device: str = "cpu"):
        from ..model import resolve_device

        self.device = str(resolve_device(device))
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}
        self._in_use: dict[str, threading.Lock] = {}
        self._tokens: dict[str, TokenText | Unanswerable] = {}

    def _spec_lock(self, spec: str) -> threading.Lock:
        with self._lock:
            return self._in_use.setdefault(spec, threading.Lock())

    @contextlib.contextmanager
    def using(self, spec: str) -> Iterator[Any]:
        """The model ``spec`` names, loaded if need be, held for this request alone."""
        from ..model import load_model

        with self._spec_lock(spec):
            if spec not in self._models:
                known = self._tokens.get(spec)  # a tokenizer the latent pages loaded is not read again
                try:
                    self._models[spec] = load_model(spec, device=self.device,
                                                    tokenizer=known.tokenizer if isinstance(known, TokenText) else None)
                except MlsaeError as e:
                    raise Unanswerable(503, f"the run's model cannot be loaded here: {e}") from None
            yield self._models[spec]

    def tokens(self, spec: str) -> TokenText:
        """The tokenizer's text of each token id (raises :class:`Unanswerable` 503 if it cannot be loaded)."""
        from ..model import load_tokenizer

        found = self._tokens.get(spec)
        if found is None:
            with self._spec_lock(spec):
                found = self._tokens.get(spec)
                if found is None:
                    model = self._models.get(spec)
                    try:
                        found = TokenText(model.tokenizer if model is not None else load_tokenizer(spec))
                    except MlsaeError as e:
                        found = Unanswerable(503, f"the run's tokenizer cannot be loaded here: {e}")
                    self._tokens[spec] = found
        if isinstance(found, Unanswerable):
            raise found
        return found


class ExampleFile:
    """``examples.parquet`` (sorted by latent), read a latent at a time: the row groups holding it
    are found from their latent min/max statistics and only those are read (a few milliseconds
    where a query over the file took 15-45). Reads are one at a time (one open file)."""

    COLUMNS = ["latent", "layer", "rank", "activation", "window", "position", "context_ids", "context_index"]

    def __init__(self, path: Path):
        self.file = pq.ParquetFile(path)
        self._lock = threading.Lock()
        meta = self.file.metadata
        column = self.file.schema_arrow.get_field_index("latent")
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        known = all(s is not None and s.has_min_max for s in stats)
        self.lo = np.array([s.min if known else -1 for s in stats], dtype=np.int64)
        self.hi = np.array([s.max if known else 2**62 for s in stats], dtype=np.int64)

    def of(self, latent: int) -> list[dict]:
        """The latent's rows, by layer then rank."""
        groups = np.nonzero((self.lo <= latent) & (self.hi >= latent))[0].tolist()
        if not groups:
            return []
        with self._lock:
            table = self.file.read_row_groups(groups, columns=self.COLUMNS)
        table = table.filter(pc.equal(table.column("latent"), latent)).sort_by([("layer", "ascending"), ("rank", "ascending")])
        return table.select(self.COLUMNS[1:]).to_pylist()


class ServedRun:
    """One run folder, opened read-only for the explorer."""

    REQUIRED = ("latents", "layer_distribution")
    """The analysis tables a latent page cannot do without."""

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
        self._lock = threading.Lock()
        self._run: Optional[RunSpec] = None  # the coder, loaded on first need
        self._model_checked = False
        self._decoders: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._heatmap: Optional[dict] = None
        self._optional: set[str] = set()
        missing = [f for f in (*(f"{t}.parquet" for t in self.REQUIRED), "summary.json") if not (self.tables / f).is_file()]
        self.analysed = not missing
        self._why_not = (f"run {self.name} has no analysis tables yet" if len(missing) == len(self.REQUIRED) + 1
                         else f"run {self.name}'s analysis is incomplete (no {', '.join(missing)})")
        self._examples: Optional[ExampleFile] = None
        if self.analysed:
            self.summary = json.loads((self.tables / "summary.json").read_text())
            self._load_tables()
            if self._table("examples"):
                self._examples = ExampleFile(self._table("examples"))

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
        join = "LEFT JOIN read_parquet(?) j USING (latent)" if joint else ""
        db.execute(
            f"CREATE TABLE latents AS SELECT l.*, l.n_tokens / ?::DOUBLE AS activation_rate, {trigger} AS trigger_layer "
            f"FROM read_parquet(?) l {join}", [seen, str(self._table("latents")), *([str(joint)] if joint else [])],
        )
        db.execute("CREATE TABLE distribution AS SELECT * FROM read_parquet(?)", [str(self._table("layer_distribution"))])
        for name in ("block_norms", "histograms"):
            if self._table(name):
                db.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet(?)", [str(self._table(name))])
                self._optional.add(name)

    def _query(self, sql: str, params: list = ()) -> list[dict]:
        cursor = self._db.cursor()  # a cursor per call: the web layer asks from several threads
        try:
            return _rows(cursor.execute(sql, list(params)))
        finally:
            cursor.close()

    def _need_analysis(self) -> None:
        if not self.analysed:
            raise Unanswerable(404, f"{self._why_not}: run `mlsae analyze {self.folder} --data TEXT` to write them")

    def has(self, table: str) -> bool:
        """Whether the run's analysis wrote this optional table (block norms: concat; histograms: recent analyses)."""
        return table in self._optional

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
        way = "DESC" if descending else "ASC"
        keys = ["dictionary_layer", "latent"] if sort == "latent" else [SORTABLE[sort]]  # a bank listed dictionary by dictionary
        order = ", ".join(f"{k} {way} NULLS LAST" for k in keys) + ", dictionary_layer, latent"
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
        examples, examples_error = self.examples(latent, d, examples_per_layer)
        return {
            "run": self.name, "arch": self.arch, "latent_space": self.latent_space, "latent": latent, "dictionary_layer": d,
            "layers": self.layers, "stats": stats[0] if stats else None, "profile": profile, "block_norms": blocks,
            "histogram": histogram, "examples": examples, "examples_error": examples_error, "nearest": self.nearest(latent, d),
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

    def examples(self, latent: int, layer: Optional[int], per_layer: int) -> tuple[list[dict], Optional[str]]:
        """Top examples at each layer (a per-layer latent: its own layer), each token of the context
        decoded; and why the tokens could not be decoded (None when they were).

        A joint latent's activity at a layer is its one activation times its decoder's share there,
        so every layer ranks the same tokens: they are listed once (``layer`` null), with the
        activation summed over layers, which is the code's own."""
        if self._examples is None:
            return [], None
        found = self._examples.of(latent)
        if self.latent_space == "joint":
            tokens: dict[tuple[int, int], dict] = {}
            for row in found:
                key = (row["window"], row["position"])
                if key in tokens:
                    tokens[key]["activation"] += row["activation"]
                else:
                    tokens[key] = {**row, "layer": None}
            rows = sorted(tokens.values(), key=lambda r: (-r["activation"], r["window"], r["position"]))[:per_layer]
            for rank, row in enumerate(rows):
                row["rank"] = rank
        else:
            rows = [r for r in found if r["rank"] < per_layer and (layer is None or r["layer"] == layer)]
        if not rows:
            return rows, None
        try:
            text = self.shelf.tokens(self.meta["model"])
        except Unanswerable as e:  # the rest of the page needs no tokenizer: token ids instead of text
            for row in rows:
                row["tokens"] = [f"[{i}]" for i in row.pop("context_ids")]
            return rows, e.message
        for row in rows:
            row["tokens"] = text(row.pop("context_ids"))
        return rows, None

    def decoders(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each dictionary's decoder rows and their inverse norms (one dictionary unless per-layer):
        cosines without a normalised copy of every decoder."""
        coder = self.coder()
        with self._lock:
            if self._decoders is None:
                self._decoders = [(d.W_dec.detach(), d.W_dec.detach().norm(dim=1).clamp_min(1e-12).reciprocal()) for d in coder.dictionaries()]
            return self._decoders

    def nearest(self, latent: int, layer: Optional[int], n: int = NEAREST) -> list[dict]:
        """The latents whose decoder rows have the largest cosine with this one's (same dictionary)."""
        W, inverse = self.decoders()[self.layers.index(layer) if layer is not None else 0]
        with torch.no_grad():
            cos = (W @ W[latent]).float() * inverse * inverse[latent]
            cos[latent] = -float("inf")
            top = torch.topk(cos, min(n, len(cos) - 1))
        return [{"latent": int(i), "dictionary_layer": layer, "cosine": round(float(c), 4)} for c, i in zip(top.values.tolist(), top.indices.tolist())]

    # ----------------------------------------------------------------------------------------
    # The live model: prompts

    def coder(self):
        with self._lock:
            if self._run is None:
                self._run = open_run(self.folder, self.shelf.device)
            return self._run.coder

    def prompt(self, text: str, top_per_cell: int = 5, heat_rows: int = 16, overall_rows: int = 20) -> dict:
        """Codes of ``text`` at every (token, layer): the top latents there; per token, a latents x
        layers heatmap of its most active latents; for the whole text, each latent's largest
        activation at each layer."""
        from ..analyze import code_prompt

        if not text.strip():
            raise Unanswerable(422, "text: expected some text to code, got an empty string")
        coder = self.coder()
        train = self.meta.get("train", {})
        with self.shelf.using(self.meta["model"]) as model:
            try:
                if not self._model_checked:
                    check_model(self._run, model)
                    self._model_checked = True
                codes = code_prompt(model, coder, text, self.ctx, bool(train.get("exclude_first_position", True)),
                                    train.get("prepend_bos", "auto"), what="text")
            except MlsaeError as e:
                raise Unanswerable(422, str(e)) from None
        activity = codes.activity.double()
        keys = codes.latents.long()  # a latent's key: its index, plus its dictionary's position x n_latents in a per-layer bank
        if self.latent_space == "per_layer":
            keys = keys + torch.arange(len(self.layers))[None, :, None] * self.n_latents
        cells, heat = [], []
        for act, idx, key in zip(activity, codes.latents, keys):  # one counted token: [layers, k] each
            order = torch.argsort(act, dim=1, descending=True)[:, :top_per_cell]
            top = zip(idx.gather(1, order).tolist(), act.gather(1, order).tolist())
            cells.append([[[i, round(v, 4)] for i, v in zip(ii, vv) if v > 0] for ii, vv in top])
            heat.append(self._key_grid(act[None], key[None], heat_rows))
        return {
            "run": self.name, "text": text, "layers": self.layers, "latent_space": self.latent_space,
            "tokens": self.shelf.tokens(self.meta["model"])(codes.ids.tolist()), "counted": codes.counted.tolist(),
            "cells": cells, "heat": heat, "overall": self._key_grid(activity, keys, overall_rows),
        }

    def _key_grid(self, activity: torch.Tensor, keys: torch.Tensor, n: int) -> dict:
        """Latents x layers of codes ``[tokens, layers, k]``: each cell the largest activity over the
        tokens; rows the ``n`` latents with the largest total, most active first."""
        L = len(self.layers)
        fired = activity > 0
        layer = torch.arange(L)[None, :, None].expand_as(keys)[fired]
        found, row = torch.unique(keys[fired], return_inverse=True)
        values = activity[fired]
        total = torch.zeros(len(found), dtype=torch.float64).index_add_(0, row, values)
        grid = torch.zeros(len(found) * L, dtype=torch.float64).scatter_reduce_(0, row * L + layer, values, "amax").view(-1, L)
        best = torch.argsort(total, descending=True, stable=True)[:n]
        return {"latents": [self._latent_key(int(found[b])) for b in best], "values": grid[best].round(decimals=4).tolist()}

    def _latent_key(self, key: int) -> dict:
        if self.latent_space == "per_layer":
            return {"latent": key % self.n_latents, "layer": self.layers[key // self.n_latents]}
        return {"latent": key, "layer": None}
