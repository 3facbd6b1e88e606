"""Run the paper's analyses over held-out text and write their tables (the ``mlsae analyze`` stage).

Reads a run, streams residual batches through the model and the coder once, feeds the
accumulators of :mod:`mlsae.analysis`, and writes into ``RUN/analysis/``:
``drift.parquet``, ``latents.parquet``, ``layer_distribution.parquet``, ``n_layers.parquet``,
``examples.parquet`` (top activations per latent and layer, with context ids; query it with
DuckDB), ``examples_preview.parquet`` (decoded text for the report), ``geometry_bins.parquet``,
``geometry_sample.parquet``, ``heatmaps.parquet`` (for ``--prompt`` texts) and ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .activations import check_finite
from .analysis import Drift, LayerDistribution, LayerMeans, TopExamples, attach_context, decoder_geometry, prompt_heatmap
from .config import save_json
from .integrity import write_checksums
from .errors import MlsaeError
from .runs import RunSpec, check_model, held_out, open_cache_for, open_run, require_data
from .model import ResidualModel, load_model, resolve_device, special_token_ids
from .text import keep_mask


def _preview(examples: pa.Table, latents_table: pa.Table, windows: torch.Tensor, decode, n_latents: int = 24, n_examples: int = 5) -> pa.Table:
    """Decoded top examples of a spread of live latents (by mean layer), for the report."""
    live = latents_table.filter(pc.invert(latents_table.column("dead")))
    if live.num_rows == 0:
        return examples.slice(0, 0)
    live = live.sort_by([("mean_layer", "ascending")])
    step = max(1, live.num_rows // n_latents)
    chosen = live.column("latent").to_pylist()[::step][:n_latents]
    rows = examples.filter(pc.is_in(examples.column("latent"), pa.array(chosen, pa.int64())))
    # the best examples of each latent over all layers
    rows = rows.sort_by([("latent", "ascending"), ("activation", "descending")])
    keep, seen = [], {}
    for i, latent in enumerate(rows.column("latent").to_pylist()):
        if seen.get(latent, 0) < n_examples:
            keep.append(i)
            seen[latent] = seen.get(latent, 0) + 1
    return attach_context(rows.take(pa.array(keep, pa.int64())), windows, decode)


def analyze(
    run_dir: str | Path,
    data: Optional[str],
    tokens: int = 20_000,
    split: str = "test",
    ctx: Optional[int] = None,
    prompts: Sequence[str] = (),
    top_n: int = 10,
    model: Optional[ResidualModel] = None,
    device: str = "auto",
    batch_tokens: int = 4096,
    out: Optional[str | Path] = None,
    progress: bool = True,
    allow_unfinished: bool = False,
) -> dict:
    """Analyse a run on held-out text; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    dev = resolve_device(device)
    run = open_run(run_dir, dev, allow_unfinished)
    require_data(run.folder, run.meta, data)
    out = Path(out) if out else run.folder / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    coder = run.coder
    cache = open_cache_for(run, data)
    if model is None:
        model = load_model(run.meta["model"], device=str(dev))
    check_model(run, model)
    shared = coder.latent_space == "shared"
    layers = coder.layers
    source = held_out(run, model, cache, data, split, ctx, batch_tokens)
    windows, excl = source.windows, source.exclude_first_position

    dist = LayerDistribution(coder.n_latents, layers, shared_dictionary=shared)
    examples = TopExamples(coder.n_latents, layers, n=top_n, per_layer=True)
    drift: Optional[Drift] = None
    seen = 0
    with tqdm(total=tokens, unit="tok", desc="analyse", disable=not progress) as bar:  # closed before an error is printed
        for batch in source.batches:
            batch = batch.slice(0, tokens - seen)
            x = batch.acts.to(dev, torch.float32)
            check_finite(x, "analysis data", layers)
            if drift is None:  # centre by the layer means of the first batch (a few thousand tokens)
                means = LayerMeans(layers, coder.d_model)
                means.update(x.cpu())
                drift = Drift(layers, layer_means=means.result())
            with torch.no_grad():
                o = coder(x)
            drift.update(x.cpu())
            dist.update(o.top_acts.cpu(), o.top_idx.cpu())
            examples.update(o.top_acts.cpu(), o.top_idx.cpu(), batch.token_ids, batch.window, batch.position)
            seen += len(batch)
            bar.update(len(batch))
            if seen >= tokens:
                break
    if drift is None:
        raise MlsaeError(f"analysis data {data} gave no tokens")

    tables = dist.result()
    windows_t = torch.stack(windows)
    top = examples.result()
    written = {
        "drift": drift.result(),
        "latents": tables["latents"],
        "layer_distribution": tables["layer_distribution"],
        "n_layers": tables["n_layers"],
        "examples": attach_context(top, windows_t),
        "examples_preview": _preview(top, tables["latents"], windows_t, lambda ids: model.tokenizer.decode(ids)),
    }
    summary = {
        "run": str(run.folder),
        "arch": coder.cfg.arch,
        "data": data,
        "n_tokens": seen,
        "drift": drift.summary(),
        "layers": dist.summary(),
    }
    if shared:
        W_dec = coder.dictionaries()[0].W_dec.detach().cpu()
        geo = decoder_geometry(W_dec, tables["latents"].column("mean_layer"))
        written["geometry_bins"], written["geometry_sample"] = geo.bins, geo.sample
        summary["geometry"] = geo.summary
    else:
        summary["geometry"] = None  # per-layer dictionaries have no shared mean layer to compare
    if prompts:
        written["heatmaps"] = prompt_heatmaps(model, run, prompts, int(windows_t.shape[1]), excl)
    for name, table in written.items():
        pq.write_table(table, out / f"{name}.parquet")
    summary["seconds"] = time.perf_counter() - started
    save_json(out / "summary.json", summary)
    write_checksums(out)  # last: the report refuses a table that no longer matches
    return summary


def prompt_heatmaps(model: ResidualModel, run: RunSpec, prompts: Sequence[str], ctx: int, exclude_first: bool = True) -> pa.Table:
    """Latents x layers maxima for each prompt, as long-format rows (prompt, latent, layer, activation).

    Positions that do not count (special tokens, the first position) are left out, as in training.
    """
    coder = run.coder
    rows: dict[str, list] = {"prompt": [], "latent": [], "layer": [], "activation": []}
    for text in prompts:
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] > ctx:
            raise MlsaeError(f"prompt of {ids.shape[1]} tokens is longer than the context ({ctx}): shorten it")
        keep = keep_mask(ids, special_token_ids(model.tokenizer), exclude_first)[0]
        if not keep.any():
            raise MlsaeError(f"prompt {text!r} has no position that counts (it is too short)")
        acts = model.capture(ids, coder.layers)[0][keep]  # [kept positions, layers, d]
        with torch.no_grad():
            o = coder(acts.float())
        heat = prompt_heatmap(o.top_acts.cpu(), o.top_idx.cpu(), coder.n_latents)
        for r, latent in enumerate(heat.latents):
            for c, layer in enumerate(coder.layers):
                rows["prompt"].append(text)
                rows["latent"].append(latent)
                rows["layer"].append(layer)
                rows["activation"].append(float(heat.values[r, c]))
    return pa.table(rows)
