"""Run the paper's analyses over held-out text and write their tables (the ``mlsae analyze`` stage).

Reads a run, streams residual batches through the model and the coder once, feeds the
accumulators of :mod:`mlsae.analysis`, and writes into ``RUN/analysis/``:
``drift.parquet``, ``latents.parquet``, ``layer_distribution.parquet``, ``n_layers.parquet``,
``examples.parquet`` (top activations per latent and layer, with context ids; query it with
DuckDB), ``examples_preview.parquet`` (decoded text for the report), ``geometry_bins.parquet``,
``geometry_sample.parquet``, ``histograms.parquet`` (each latent's activations, log-spaced bins),
``heatmaps.parquet`` (for ``--prompt`` texts) and ``summary.json``. Examples are written in row
groups of ``EXAMPLE_ROW_GROUP`` rows, sorted by latent, so that one latent's rows are found by the
row groups' statistics without reading the rest (the explorer's latent page).

What a latent's layer profile is comes from the arrangement (:meth:`SparseCoder.activity_by_layer`):
where it fires for shared and per-layer latents, where it writes for joint (concat) ones. A concat
run also gets ``joint_latents.parquet`` (trigger layer, activation rate), ``block_norms.parquet``,
``decoder_cosines.parquet``, ``flow.parquet`` / ``flow_buckets.parquet`` (information flow) and,
for ``--flow-text``, ``flow_text.parquet`` (:mod:`mlsae.analysis.joint`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .activations import check_finite
from .analysis import (
    ActivationHistogram, Drift, LayerDistribution, LayerMeans, TopExamples, attach_context, block_norm_table, block_norms,
    decoder_cosines, decoder_geometry, flow_by_bucket, flow_items, information_flow, joint_latents, most_active, prompt_heatmap,
)
from .config import JointAnalysisConfig, save_json
from .dist import World, device_for, world
from .integrity import write_checksums
from .errors import MlsaeError
from .runs import RunSpec, check_model, held_out, open_cache_for, open_run, require_data
from .model import ResidualModel, load_model, resolve_device, special_token_ids
from .text import bos_for, keep_mask


EXAMPLE_ROW_GROUP = 4096
"""Rows per row group of ``examples.parquet``: a latent's page reads the one or two holding its rows (at 30
layers x 10 examples, a group holds about 14 latents; 4x larger groups made that page 3x slower)."""


def _preview(examples: pa.Table, latents_table: pa.Table, windows: torch.Tensor, decode, n_latents: int = 24, n_examples: int = 5) -> pa.Table:
    """Decoded top examples of a spread of live latents (by mean layer), for the report."""
    live = latents_table.filter(pc.invert(latents_table.column("dead")))
    if live.num_rows == 0:
        return examples.slice(0, 0)
    live = live.sort_by([("mean_layer", "ascending")])
    step = max(1, live.num_rows // n_latents)
    chosen = live.column("latent").to_pylist()[::step][:n_latents]
    rows = examples.filter(pc.is_in(examples.column("latent"), pa.array(chosen, pa.int64())))
    # the best examples of each latent over all layers, each token once
    rows = rows.sort_by([("latent", "ascending"), ("activation", "descending")])
    keep, seen, tokens = [], {}, set()
    cols = (rows.column(c).to_pylist() for c in ("latent", "window", "position"))
    for i, (latent, window, position) in enumerate(zip(*cols)):
        if seen.get(latent, 0) < n_examples and (latent, window, position) not in tokens:
            keep.append(i)
            seen[latent] = seen.get(latent, 0) + 1
            tokens.add((latent, window, position))
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
    joint: Optional[JointAnalysisConfig] = None,
) -> dict:
    """Analyse a run on held-out text; returns the summary (also written to summary.json).
    Under torchrun each process reads every world-size-th part of the text and rank 0 merges,
    finishes and writes (the other processes return an empty summary).

    ``joint`` holds the settings of a concat run's own analyses (defaults when None).
    """
    started = time.perf_counter()
    joint = joint or JointAnalysisConfig()
    ranks = world(resolve_device(device))
    dev = resolve_device(device_for(device, ranks))
    progress = progress and ranks.writes
    run = open_run(run_dir, dev, allow_unfinished)
    require_data(run.folder, run.meta, data)
    coder = run.coder
    check_joint_settings(run, joint)
    cache = open_cache_for(run, data)
    if model is None:
        model = load_model(run.meta["model"], device=str(dev))
    check_model(run, model)
    out = Path(out) if out else run.folder / "analysis"
    if ranks.writes:
        out.mkdir(parents=True, exist_ok=True)
    shared = coder.latent_space == "shared"
    layers = coder.layers
    source = held_out(run, model, cache, data, split, ctx, batch_tokens)
    windows, excl = source.windows, source.exclude_first_position

    dist = LayerDistribution(coder.n_latents, layers, shared_dictionary=coder.latent_space != "per_layer")
    examples = TopExamples(coder.n_latents, layers, n=top_n, per_layer=True)
    code_rows = 1 if coder.latent_space == "joint" else len(layers)
    histogram = ActivationHistogram(coder.n_latents, code_rows, per_layer=coder.latent_space == "per_layer")
    drift: Optional[Drift] = None
    seen = 0  # over all processes: under torchrun each reads every world-size-th part
    with tqdm(total=tokens, unit="tok", desc="analyse", disable=not progress) as bar:  # closed before an error is printed
        for j, part in enumerate(source.parts):
            take = min(part.n_rows, tokens - seen)
            seen += take
            bar.update(take)
            mine = j % ranks.size == ranks.rank
            if not (mine or drift is None):
                if seen >= tokens:
                    break
                continue
            batch = part.load().slice(0, take)
            x = batch.acts.to(dev, torch.float32)
            check_finite(x, "analysis data", layers)
            with torch.no_grad():
                seen_x = (coder.lens_space(x) or (x,))[0].cpu()  # a lens run's analyses read the translated vectors
            if drift is None:  # centre by the layer means of the first batch (a few thousand tokens; every process reads it)
                means = LayerMeans(layers, coder.d_model)
                means.update(seen_x)
                drift = Drift(layers, layer_means=means.result())
            if not mine:
                continue
            with torch.no_grad():
                o = coder(x)
            drift.update(seen_x)
            activity, at_layers = (t.cpu() for t in coder.layer_profile(o.top_acts, o.top_idx))  # the arrangement's per-layer profile
            dist.update(activity, at_layers)
            histogram.update(o.top_acts, o.top_idx)
            examples.update(activity, at_layers, batch.token_ids, batch.window, batch.position)
            if seen >= tokens:
                break
    if drift is None:
        raise MlsaeError(f"analysis data {data} gave no tokens")
    _add_up(ranks, dist, drift, examples, histogram)
    if not ranks.writes:  # under torchrun, rank 0 finishes and writes the tables
        return {}

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
        "histograms": histogram.result(layers),
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
        summary["geometry"] = None  # per-layer and joint dictionaries have no shared mean layer to compare
    if coder.latent_space == "joint":
        n_tokens = torch.tensor(tables["latents"].column("n_tokens").to_numpy())
        tables_joint, summary["joint"] = joint_analyses(model, run, joint, windows_t, excl, n_tokens, seen, progress, batch_tokens)
        written.update(tables_joint)
    if prompts:
        written["heatmaps"] = prompt_heatmaps(model, run, prompts, int(windows_t.shape[1]), excl)
    for name, table in written.items():
        pq.write_table(table, out / f"{name}.parquet", row_group_size=EXAMPLE_ROW_GROUP if name == "examples" else None)
    summary["seconds"] = time.perf_counter() - started
    save_json(out / "summary.json", summary)
    write_checksums(out)  # last: the report refuses a table that no longer matches
    return summary


def _add_up(ranks: World, dist: LayerDistribution, drift: Drift, examples: TopExamples, histogram: ActivationHistogram) -> None:
    """Under torchrun: every process's accumulators (of its own tokens) merged into the whole's."""
    if not ranks.distributed:
        return
    ranks.sum_fields(dist, LayerDistribution.SUMMED)
    ranks.sum_fields(drift, Drift.SUMMED)
    ranks.sum_fields(histogram, ActivationHistogram.SUMMED)
    keys = ranks.gather(examples.key)
    slabs = [{} for _ in keys]
    for f, slab in examples.slab.items():
        for r, part in enumerate(ranks.gather(slab)):
            slabs[r][f] = part
    examples.absorb(keys, slabs)


@dataclass
class PromptCodes:
    """A text's tokens and, at the positions that count, its per-layer codes: ``activity`` and
    ``latents`` ``[counted positions, layers, k]`` (:meth:`SparseCoder.layer_profile`)."""

    ids: torch.Tensor  # [positions] token ids
    counted: torch.Tensor  # [positions] bool: special tokens and (by default) the first position do not count
    activity: torch.Tensor
    latents: torch.Tensor


def code_prompt(model: ResidualModel, coder, text: str, ctx: int, exclude_first: bool = True, prepend_bos: str = "auto",
                what: str = "prompt") -> PromptCodes:
    """Run ``text`` through the model and the coder as training saw text: BOS as the run's
    ``prepend_bos`` says, positions that do not count left out."""
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    bos = bos_for(model.tokenizer, prepend_bos)
    ids = torch.tensor([([bos] if bos is not None else []) + list(ids)], dtype=torch.long)
    if ids.shape[1] > ctx:
        raise MlsaeError(f"{what} of {ids.shape[1]} tokens is longer than the context ({ctx}): shorten it")
    keep = keep_mask(ids, special_token_ids(model.tokenizer), exclude_first)[0]
    if not keep.any():
        raise MlsaeError(f"{what} {text!r} has no position that counts (it is too short)")
    acts = model.capture(ids, coder.layers)[0][keep]  # [kept positions, layers, d]
    with torch.no_grad():
        o = coder(acts.to(coder.dictionaries()[0].W_enc.device, torch.float32))
        activity, latents = (t.cpu() for t in coder.layer_profile(o.top_acts, o.top_idx))
    return PromptCodes(ids[0], keep, activity, latents)


def prompt_heatmaps(model: ResidualModel, run: RunSpec, prompts: Sequence[str], ctx: int, exclude_first: bool = True) -> pa.Table:
    """Latents x layers maxima for each prompt, as long-format rows (prompt, latent, layer, activation).

    Positions that do not count (special tokens, the first position) are left out, as in training.
    """
    coder = run.coder
    rows: dict[str, list] = {"prompt": [], "latent": [], "layer": [], "activation": []}
    for text in prompts:
        codes = code_prompt(model, coder, text, ctx, exclude_first, run.meta.get("train", {}).get("prepend_bos", "auto"))
        heat = prompt_heatmap(codes.activity, codes.latents, coder.n_latents)
        for r, latent in enumerate(heat.latents):
            for c, layer in enumerate(coder.layers):
                rows["prompt"].append(text)
                rows["latent"].append(latent)
                rows["layer"].append(layer)
                rows["activation"].append(float(heat.values[r, c]))
    return pa.table(rows)


# --------------------------------------------------------------------------------------------
# A joint (concat) coder's own analyses


def check_joint_settings(run: RunSpec, joint: JointAnalysisConfig) -> None:
    """The concat-only settings make sense for this run: checked before any model loads."""
    coder, L = run.coder, len(run.coder.layers)
    per_token = joint.flow_text is not None or joint.flow_latent is not None
    if coder.latent_space != "joint":
        if per_token or joint.flow_max_k is not None:
            raise MlsaeError(f"--flow-text/--flow-latent/--flow-max-k: information flow needs a concat run; {run.folder} holds a {coder.arch} coder")
        return
    if joint.flow_max_k is not None and joint.flow_max_k > L - 1:
        raise MlsaeError(f"--flow-max-k {joint.flow_max_k}: {run.folder} has {L} layers, so layer l+k exists only for k <= {L - 1}")
    if per_token and (joint.flow_text is None or not joint.flow_latent):
        raise MlsaeError("--flow-text and --flow-latent go together: a text, and the latents to follow on it")
    bad = [f for f in joint.flow_latent or [] if not 0 <= f < coder.n_latents]
    if bad:
        raise MlsaeError(f"--flow-latent {bad[0]}: expected a latent in [0, {coder.n_latents})")
    if L < 2 and (per_token or joint.flow_latents_per_bucket):
        raise MlsaeError(f"{run.folder} has one layer: information flow needs at least two (set --flow-latents-per-bucket 0)")


@torch.no_grad()
def _probe(model: ResidualModel, run: RunSpec, ids: torch.Tensor, exclude_first: bool, batch_tokens: int, windows_per_batch: int = 16):
    """Clean residuals ``[windows, pos, layers, d]`` of ``ids`` and the joint codes of the
    positions that count, with their window and position."""
    coder = run.coder
    special = special_token_ids(model.tokenizer)
    resid = torch.cat([model.capture(ids[i : i + windows_per_batch], coder.layers).float() for i in range(0, len(ids), windows_per_batch)])
    keep = keep_mask(ids, special, exclude_first)
    window, position = keep.nonzero(as_tuple=True)
    kept = resid[keep]
    device = coder.sae.W_enc.device
    codes = [coder(kept[i : i + batch_tokens].to(device)) for i in range(0, len(kept), batch_tokens)]  # memory of one batch
    acts = torch.cat([o.top_acts.cpu() for o in codes]) if codes else torch.zeros(0, 1, 1)
    idx = torch.cat([o.top_idx.cpu() for o in codes]) if codes else torch.zeros(0, 1, 1, dtype=torch.long)
    return resid.cpu(), acts, idx, window, position


def _flow(model: ResidualModel, run: RunSpec, ids, resid, items, trigger, joint: JointAnalysisConfig, progress: bool):
    coder = run.coder
    dev = model.device
    return information_flow(
        model.residuals_from, coder.transform, coder.transform.inverse_delta, coder.transform.forward_delta,
        coder.decoder_blocks().detach().to(dev),
        coder.layers, ids.to(dev), resid.to(dev), items, trigger=trigger, max_k=joint.flow_max_k, progress=progress,
    )


def joint_analyses(
    model: ResidualModel, run: RunSpec, joint: JointAnalysisConfig, windows: torch.Tensor, exclude_first: bool,
    n_tokens: torch.Tensor, tokens_seen: int, progress: bool, batch_tokens: int = 4096,
) -> tuple[dict[str, pa.Table], dict]:
    """Banding, activation rates, decoder cosines and information flow of a concat coder."""
    coder = run.coder
    layers, L = coder.layers, len(coder.layers)
    enc = block_norms(coder.sae.W_enc, L).cpu()
    dec = block_norms(coder.sae.W_dec, L).cpu()
    latents = joint_latents(enc, dec, n_tokens, tokens_seen, layers)
    cosines = decoder_cosines(coder.decoder_blocks().cpu(), latents, layers, top=joint.cosine_latents)
    tables = {"joint_latents": latents, "block_norms": block_norm_table(enc, dec, layers), "decoder_cosines": cosines}
    active = latents.column("active").to_numpy(zero_copy_only=False)
    trigger = enc.argmax(1)
    summary = {
        "n_active": int(active.sum()),
        "never_active": int((~active).sum()),
        "trigger_counts": {str(l): int(((trigger == i) & torch.from_numpy(active)).sum()) for i, l in enumerate(layers)},
        "mean_n_layers_90": float(np.mean(latents.column("n_layers_90").to_numpy()[active])) if active.any() else None,
        "mean_cosine_by_k": {str(k): c for k, c, b in zip(cosines.column("k").to_pylist(), cosines.column("mean_cosine").to_pylist(),
                                                          cosines.column("trigger_layer").to_pylist()) if b is None},
    }
    if joint.flow_latents_per_bucket:  # a one-layer run was refused by check_joint_settings
        started = time.perf_counter()
        chosen = sorted({f for layer in layers for f in most_active(latents, joint.flow_latents_per_bucket, layer)})
        ids = windows[: joint.flow_windows, : joint.flow_positions]
        resid, acts, idx, window, position = _probe(model, run, ids, exclude_first, batch_tokens)
        items = flow_items(acts, idx, window, position, chosen, joint.flow_tokens)
        flow = _flow(model, run, ids, resid, items, trigger, joint, progress)
        tables["flow"], tables["flow_buckets"] = flow, flow_by_bucket(flow)
        summary["flow"] = {"latents": len(chosen), "items": len(items), "seconds": time.perf_counter() - started,
                           **_flow_means(flow)}
    if joint.flow_text is not None:
        ids = model.tokenizer(joint.flow_text, return_tensors="pt").input_ids
        if ids.shape[1] > windows.shape[1]:
            raise MlsaeError(f"--flow-text of {ids.shape[1]} tokens is longer than the context ({windows.shape[1]}): shorten it")
        resid, acts, idx, window, position = _probe(model, run, ids, exclude_first, batch_tokens)
        items = flow_items(acts, idx, window, position, joint.flow_latent, ids.shape[1])
        flow = _flow(model, run, ids, resid, items, trigger, joint, progress)
        tokens = [model.tokenizer.decode([t]) for t in ids[0].tolist()]
        tables["flow_text"] = flow.append_column("token", pa.array([tokens[p] for p in flow.column("position").to_pylist()], pa.string()))
        summary["flow_text"] = {"text": joint.flow_text, "latents": list(joint.flow_latent), "items": len(items)}
    return tables, summary


def _flow_means(flow: pa.Table) -> dict:
    """Mean cosine and strength by gap k over every latent, token and source layer."""
    if flow.num_rows == 0:
        return {"mean_cosine_by_k": {}, "mean_strength_by_k": {}}
    g = flow.group_by("k").aggregate([("cosine", "mean"), ("strength", "mean")]).sort_by("k")
    ks = g.column("k").to_pylist()
    return {"mean_cosine_by_k": dict(zip(map(str, ks), g.column("cosine_mean").to_pylist())),
            "mean_strength_by_k": dict(zip(map(str, ks), g.column("strength_mean").to_pylist()))}
