"""A static HTML report of a run: figures (matplotlib, PNG beside the page) and tables.

It reads only files: the run's ``config.json`` and ``metrics.jsonl``, ``eval.parquet`` (and
``compare.parquet``) from ``mlsae eval``, and ``analysis/`` from ``mlsae analyze``. A section
whose inputs are missing says which command fills it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from .errors import MlsaeError  # noqa: E402
from .integrity import file_problem, recorded_checksum  # noqa: E402
from .sae import latent_space_of, read_coder_config  # noqa: E402

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; }
.note { background: #fff8e0; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
.headline { font-size: 1.15em; background: #eef5ff; padding: 0.6em 1em; border-left: 4px solid #3070d0; }
.ex { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; margin: 0.1em 0; }
.ex mark { background: #ffb347; font-weight: bold; }
.latent { margin: 0.8em 0; }
"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return html.escape(str(v))


def _table_html(table: pa.Table, columns: Optional[list[str]] = None) -> str:
    cols = [c for c in (columns or table.column_names) if c in table.column_names]
    data = {c: table.column(c).to_pylist() for c in cols}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(data[c][i])}</td>" for c in cols) + "</tr>" for i in range(table.num_rows))
    return f"<table><tr>{head}</tr>{body}</table>"


class Report:
    def __init__(self, run: Path, out: Path):
        self.run, self.out = run, out
        self.parts: list[str] = []
        self.figures: list[str] = []

    def figure(self, name: str, draw: Callable[[plt.Figure], None], size=(8, 3.6), caption: str = "") -> None:
        fig = plt.figure(figsize=size, dpi=100)
        draw(fig)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png")
        plt.close(fig)
        self.figures.append(f"{name}.png")
        self.parts.append(f'<figure><img src="{name}.png" alt="{html.escape(name)}"><figcaption>{caption}</figcaption></figure>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def missing(self, what: str, command: str) -> None:
        self.parts.append(f'<p class="note">No {what} yet: run <code>{html.escape(command)}</code> to fill this section.</p>')


def _read(path: Path) -> Optional[pa.Table]:
    """A table the run holds, or None if it has none yet; one whose checksum no longer matches is refused."""
    if not path.is_file():
        return None
    expected = recorded_checksum(path)
    if expected is None and path.name == "eval.parquet" and (path.parent / "eval.json").is_file():
        expected = json.loads((path.parent / "eval.json").read_text()).get("eval_parquet_sha256")
    problem = file_problem(path, expected)
    if problem:
        stage = "mlsae analyze" if path.parent.name == "analysis" else "mlsae eval"
        raise MlsaeError(f"{problem}: run `{stage}` again")
    return pq.read_table(path)


def build_report(run_dir: str | Path, out: Optional[str | Path] = None, compare: Sequence[str | Path] = ()) -> Path:
    """Write ``index.html`` and its figures; returns the path of the page. ``compare``: other
    analysed runs set beside this one where a figure compares arrangements."""
    run = Path(run_dir)
    meta = read_coder_config(run)
    others = {Path(c): read_coder_config(c) for c in compare}
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    r = Report(run, out)
    sae, train = meta["sae"], meta.get("train", {})
    r.add(f"<h1>MLSAE report: {html.escape(run.name)}</h1>")
    r.add(
        f"<p>{html.escape(sae['arch'])} coder on <b>{html.escape(str(meta['model']))}</b>, layers "
        f"{_layer_list(meta['layers'])} "
        f"({len(meta['layers'])}), {meta['n_latents']:,} latents (R = {_expansion(meta):.3g} per input dimension), "
        f"k = {sae['k']}, trained on {train.get('tokens', '?'):,} tokens of "
        f"<code>{html.escape(str(train.get('data')))}</code>; training minimises FVU on the {sae['loss_space']} vectors.</p>"
        if isinstance(train.get("tokens"), int)
        else f"<p>{html.escape(sae['arch'])} coder on {html.escape(str(meta['model']))}</p>"
    )
    init = meta.get("init")
    if init:
        r.add(
            f"<p>Input transforms: {html.escape(', '.join(init['transforms']) or 'none')}; b_pre start: "
            f"{html.escape(init['b_pre'].replace('_', ' '))}; both set on the first {init['tokens']:,} tokens, where the "
            f"FVU was {init['fvu']:.3f} (layers {min(init['fvu_per_layer']):.3f} to {max(init['fvu_per_layer']):.3f}).</p>"
        )
        if "encoder_scale" in init:
            r.add(f"<p>The encoder was scaled by {init['encoder_scale']:.4g} on that batch (c = {init['init_gain']}) so the first "
                  f"reconstruction has c times the input's scale: FVU {init['fvu_before_scaling']:.3f} before the scaling, "
                  f"{init['fvu_after_scaling']:.3f} after (in the coder's space).</p>")
    if meta.get("lens"):
        _lens(r, meta["lens"])
    _training(r)
    _evaluation(r)
    _analysis(r, meta)
    if others:
        _side_by_side(r, {run: meta, **others})
    if others or latent_space_of(meta) == "joint":  # a figure for comparing systems
        _layer_span(r, {run: meta, **others})
    page = out / "index.html"
    body = "\n".join(r.parts)
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>MLSAE report: {html.escape(run.name)}</title>"
                    f"<style>{CSS}</style></head><body>{body}</body></html>")
    return page


def _layer_list(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 8 else f"{layers[0]}..{layers[-1]}"


def _expansion(meta: dict) -> float:
    """Latents per input dimension of a dictionary: d_model, or d_model x layers for a concat coder."""
    d_in = meta["d_model"] * (len(meta["layers"]) if latent_space_of(meta) == "joint" else 1)
    return meta["n_latents"] / d_in


def _training(r: Report) -> None:
    r.add("<h2>Training</h2>")
    path = r.run / "metrics.jsonl"
    if not path.is_file():
        r.missing("training metrics", f"mlsae train --out {r.run}")
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        r.missing("training metrics", f"mlsae train --out {r.run}")
        return

    def draw(fig):
        ax = fig.add_subplot(1, 2, 1)
        ax.plot([m["tokens"] for m in rows], [m["fvu"] for m in rows], lw=1)
        ax.set(xlabel="training tokens", ylabel="FVU (mean over layers)", title="training FVU")
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot([m["tokens"] for m in rows], [100 * m["dead_fraction"] for m in rows], lw=1, color="C3")
        ax2.set(xlabel="training tokens", ylabel="dead latents (%)", title="dead latents")

    r.figure("training", draw, caption="Training FVU (in the loss space) and the share of dead latents.")


def _evaluation(r: Report) -> None:
    r.add("<h2>Evaluation (held-out text)</h2>")
    table = _read(r.run / "eval.parquet")
    if table is None:
        r.missing("evaluation", f"mlsae eval {r.run} --data HELD_OUT_TEXT")
        return
    cols = ["layer", "fvu", "fvu_standardized", "fvu_lens", "fvu_lens_standardized", "fvu_paper", "mse", "l0", "l1", "dead_fraction", "delta_ce", "delta_ce_paper",
            "kl", "kl_paper", "loss_recovered_zero", "loss_recovered_mean"]
    layers = table.column("layer").to_pylist()[:-1]

    def draw(fig):
        x = [int(v) for v in layers]
        ax = fig.add_subplot(1, 2, 1)
        ax.plot(x, table.column("fvu").to_pylist()[:-1], "o-", ms=3, label="raw")
        ax.plot(x, table.column("fvu_standardized").to_pylist()[:-1], "s-", ms=3, label="standardised")
        ax.set(xlabel="layer", ylabel="FVU", title="reconstruction")
        ax.legend()
        if "delta_ce" in table.column_names:
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.plot(x, table.column("delta_ce").to_pylist()[:-1], "o-", ms=3, color="C2")
            ax2.set(xlabel="layer", ylabel="delta CE (nats)", title="downstream loss when spliced")

    r.figure("evaluation", draw, caption="FVU per layer (raw and standardised vectors) and the increase in next-token cross-entropy.")
    r.add("<p>Columns ending in <code>_paper</code> follow the paper's code: FVU against ONE scalar mean per layer "
          "rather than the per-component mean (lower for the same error), and delta CE / KL with the reconstruction "
          "spliced and scored at EVERY position, the attention-sink first position included (present with "
          "<code>mlsae eval --paper-definitions</code>).</p>")
    r.add(_table_html(table, cols))
    cmp = _read(r.run / "compare.parquet")
    if cmp is not None:
        r.add("<h3>Against the other runs (per layer)</h3>" + _table_html(cmp))


def _analysis(r: Report, meta: dict) -> None:
    folder = r.run / "analysis"
    summary_path = folder / "summary.json"
    r.add("<h2>Analyses</h2>")
    if not summary_path.is_file():
        r.missing("analysis", f"mlsae analyze {r.run} --data HELD_OUT_TEXT")
        return
    summary = json.loads(summary_path.read_text())
    lay = summary["layers"]
    ratio = lay.get("variance_ratio")
    r.add(
        '<p class="headline">'
        f"Mean adjacent-layer cosine similarity of the residual stream: <b>{_fmt(summary['drift']['mean_cosine'])}</b> "
        f"(mean-centred: {_fmt(summary['drift']['mean_cosine_centred'])}).<br>"
        f"Variance of a latent's layer distribution, aggregated over tokens / per token: <b>{_fmt(ratio)}</b> "
        f"(paper definition: {_fmt(lay.get('variance_ratio_paper'))}).<br>"
        f"Latents active at more than one layer: <b>{_fmt(lay.get('multi_layer_fraction_aggregated'))}</b> aggregated over "
        f"{summary['n_tokens']:,} tokens, <b>{_fmt(lay.get('multi_layer_fraction_per_token'))}</b> per token.</p>"
    )
    r.add(
        "<p>Definitions (Lawson et al. section 4): latent <i>i</i>'s layer distribution is p<sub>i</sub>(l) &prop; the sum of "
        "its activations at layer <i>l</i>. Aggregated variance: the variance over layers of p<sub>i</sub>, over all tokens. "
        "Per-token variance: for each token where latent <i>i</i> fires, the variance over layers of that token's "
        "activations (normalised per token), averaged over those tokens only. The ratio is the mean aggregated variance "
        "over live latents divided by the mean per-token variance. The paper definition (the authors' code) averages "
        "each token's normalised activations q over ALL tokens without renormalising, so its aggregated "
        "&quot;variance&quot; carries a rate &times; (1 &minus; rate) &times; mean-layer&sup2; term, and averages the "
        "per-token variance over all (token, latent) pairs, inactive ones as 0: it reads much larger on the same "
        "codes.</p>"
    )
    if latent_space_of(meta) == "joint":
        r.add("<p>This is a concat coder: a latent's layer profile is where it <i>writes</i> (its decoder block's share of "
              "the row's squared norm at each layer), the same at every token, so its per-token and aggregated variances "
              "are equal by construction and the ratio above reads 1. Its own analyses follow.</p>")
        _joint(r, folder)
    _drift(r, folder)
    _layer_distribution(r, folder, meta)
    _variances(r, folder)
    _geometry(r, folder)
    _heatmaps(r, folder)
    _examples(r, folder)


def _drift(r: Report, folder: Path) -> None:
    t = _read(folder / "drift.parquet")
    if t is None:
        return
    r.add("<h3>Residual-stream drift</h3>")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for centred, label in ((False, "raw"), (True, "mean-centred")):
            rows = t.filter(pc.equal(t.column("centred"), centred))
            if rows.num_rows == 0:
                continue
            x = rows.column("layer").to_pylist()
            ax.plot(x, rows.column("mean").to_pylist(), "o-", ms=3, label=label)
            ax.fill_between(x, rows.column("p10").to_pylist(), rows.column("p90").to_pylist(), alpha=0.2)
        ax.set(xlabel="layer l (pair l, l+1)", ylabel="cosine similarity", title="adjacent-layer cosine similarity (band: 10th-90th percentile)")
        ax.legend()

    r.figure("drift", draw, caption="Cosine similarity between the residual vectors of adjacent layers at the same token.")


def _layer_distribution(r: Report, folder: Path, meta: dict) -> None:
    lat = _read(folder / "latents.parquet")
    dist = _read(folder / "layer_distribution.parquet")
    if lat is None or dist is None or latent_space_of(meta) != "shared":
        return
    r.add("<h3>Layer distribution of the latents</h3>")
    layers = meta["layers"]
    n = meta["n_latents"]
    grid = np.zeros((n, len(layers)))
    col = {l: j for j, l in enumerate(layers)}
    grid[dist.column("latent").to_numpy(), [col[l] for l in dist.column("layer").to_pylist()]] = dist.column("probability").to_numpy()
    mean_layer = np.array([np.inf if v is None else v for v in lat.column("mean_layer").to_pylist()])
    live = np.isfinite(mean_layer)
    order = np.argsort(mean_layer[live], kind="stable")
    shown = grid[live][order]
    shown = shown / np.maximum(shown.max(1, keepdims=True), 1e-12)  # each latent relative to its peak layer

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(shown.T, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                       extent=(0, len(shown), layers[0] - 0.5, layers[-1] + 0.5))
        ax.set(xlabel=f"live latents ({len(shown):,}), sorted by mean layer", ylabel="layer", title="p_i(l) / max_l p_i(l): latent i's activation by layer, relative to its peak")
        fig.colorbar(im, ax=ax)

    r.figure("layer_distribution", draw, size=(9, 4), caption="Each column is a latent; dead latents are left out.")


def _variances(r: Report, folder: Path) -> None:
    lat = _read(folder / "latents.parquet")
    nl = _read(folder / "n_layers.parquet")
    if lat is None:
        return
    agg = np.array([v for v in lat.column("aggregated_variance").to_pylist() if v is not None])
    pt = np.array([v for v in lat.column("per_token_variance").to_pylist() if v is not None])
    r.add("<h3>Per-token versus aggregated variance over layers</h3>")

    def draw(fig):
        ax = fig.add_subplot(1, 2, 1)
        hi = max(agg.max() if len(agg) else 1, pt.max() if len(pt) else 1, 1e-3)
        bins = np.linspace(0, hi, 40)
        ax.hist(pt, bins=bins, alpha=0.6, label=f"per token (mean {pt.mean() if len(pt) else 0:.3f})")
        ax.hist(agg, bins=bins, alpha=0.6, label=f"aggregated (mean {agg.mean() if len(agg) else 0:.3f})")
        ax.set(xlabel="variance over layers", ylabel="latents", title="variance of the layer distribution", yscale="log")
        ax.legend(fontsize=8)
        if nl is not None:
            ax2 = fig.add_subplot(1, 2, 2)
            x = np.array(nl.column("n_layers").to_pylist())
            ax2.bar(x - 0.2, [v or 0 for v in nl.column("per_token_fraction").to_pylist()], width=0.4, label="per token")
            ax2.bar(x + 0.2, [v or 0 for v in nl.column("aggregated_fraction").to_pylist()], width=0.4, label="aggregated")
            ax2.set(xlabel="number of layers a latent is active at", ylabel="fraction", title="layers active")
            ax2.legend(fontsize=8)

    r.figure("variances", draw, size=(10, 3.8), caption="Left: per latent. Right: per (token, latent) pair and per latent over all tokens.")


def _geometry(r: Report, folder: Path) -> None:
    bins = _read(folder / "geometry_bins.parquet")
    sample = _read(folder / "geometry_sample.parquet")
    if bins is None or sample is None:
        return
    r.add("<h3>Decoder geometry</h3>")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(sample.column("dlayer").to_numpy(), sample.column("cosine").to_numpy(), s=1, alpha=0.15)
        mids = (np.array(bins.column("dlayer_lo").to_pylist()) + np.array(bins.column("dlayer_hi").to_pylist())) / 2
        ax.plot(mids, bins.column("mean_abs_cosine").to_pylist(), "o-", color="C3", ms=3, label="mean |cosine|")
        ax.set(xlabel="|difference of mean layers|", ylabel="decoder cosine similarity", title="decoder directions vs mean layer")
        ax.legend()

    r.figure("geometry", draw, caption="Cosine similarity of pairs of latents' decoder vectors against the distance of their mean layers.")


def _heatmaps(r: Report, folder: Path) -> None:
    t = _read(folder / "heatmaps.parquet")
    if t is None or t.num_rows == 0:
        return
    r.add("<h3>Prompt heatmaps</h3>")
    prompts = list(dict.fromkeys(t.column("prompt").to_pylist()))[:4]
    for i, prompt in enumerate(prompts):
        rows = t.filter(pc.equal(t.column("prompt"), prompt))
        latents = list(dict.fromkeys(rows.column("latent").to_pylist()))
        layers = sorted(set(rows.column("layer").to_pylist()))
        grid = np.zeros((len(latents), len(layers)))
        for latent, layer, value in zip(*(rows.column(c).to_pylist() for c in ("latent", "layer", "activation"))):
            grid[latents.index(latent), layers.index(layer)] = value

        def draw(fig, grid=grid, latents=latents, layers=layers):
            ax = fig.add_subplot(1, 1, 1)
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(latents)), [str(v) for v in latents], fontsize=7)
            step = max(1, len(layers) // 15)
            ax.set_xticks(range(0, len(layers), step), [str(v) for v in layers[::step]])
            ax.set(xlabel="layer", ylabel="latent (most active first)")
            fig.colorbar(im, ax=ax)

        r.figure(f"heatmap_{i}", draw, size=(8, 4.5), caption=f"Largest activation of each latent at each layer over the prompt: <code>{html.escape(prompt)}</code>")


def _examples(r: Report, folder: Path) -> None:
    t = _read(folder / "examples_preview.parquet")
    if t is None or "token_text" not in t.column_names:
        return
    lat = _read(folder / "latents.parquet")
    mean_layer = {}
    if lat is not None:
        for latent, ml in zip(lat.column("latent").to_pylist(), lat.column("mean_layer").to_pylist()):
            mean_layer.setdefault(latent, ml)
    r.add("<h3>Top examples of a few latents</h3><p>Latents spread over mean layers; the highlighted token is where the latent fires. "
          "All examples: <code>analysis/examples.parquet</code> (query it with DuckDB).</p>")
    rows = t.to_pylist()
    current = None
    parts = []
    for row in rows:
        if row["latent"] != current:
            if current is not None:
                parts.append("</div>")
            current = row["latent"]
            parts.append(f'<div class="latent"><b>latent {current}</b> (mean layer {_fmt(mean_layer.get(current))})')
        parts.append(
            f'<p class="ex">[layer {row["layer"]}, {row["activation"]:.2f}] {html.escape(row["text_before"])}'
            f'<mark>{html.escape(row["token_text"])}</mark>{html.escape(row["text_after"])}</p>'
        )
    if current is not None:
        parts.append("</div>")
    r.add("".join(parts))



# --------------------------------------------------------------------------------------------
# A concat (joint) coder: banding, activation rates, decoder cosines, information flow


def _joint(r: Report, folder: Path) -> None:
    lat = _read(folder / "joint_latents.parquet")
    norms = _read(folder / "block_norms.parquet")
    if lat is None or norms is None:
        r.missing("concat analyses", f"mlsae analyze {r.run} --data HELD_OUT_TEXT")
        return
    layers = sorted(set(norms.column("layer").to_pylist()))
    L, n = len(layers), lat.num_rows
    enc = norms.column("enc_norm").to_numpy().reshape(n, L)
    dec = norms.column("dec_norm").to_numpy().reshape(n, L)
    active = lat.column("active").to_numpy(zero_copy_only=False)
    rate = lat.column("activation_rate").to_numpy()
    trigger = np.array(lat.column("trigger_layer").to_pylist())
    order = np.lexsort((rate, trigger))  # by trigger bucket, then least active first
    order = order[active[order]]
    n_active = len(order)
    if n_active > 4000:  # an even subsample keeps the picture and the file small
        order = order[np.linspace(0, n_active - 1, 4000).astype(int)]
    shown_label = f"{len(order):,} of the {n_active:,} active latents" if len(order) < n_active else f"active latents ({n_active:,})"
    r.add("<h3>Banding: where latents read and write</h3>")
    r.add(f"<p>{int(active.sum()):,} of {n:,} latents fired on the analysed tokens ({int((~active).sum()):,} never did). Each "
          "column is an active latent; the colour is the norm of its encoder (left) or decoder (right) block at each layer, "
          "relative to its largest block. Latents are grouped by trigger layer (the layer of the largest encoder block; "
          "white lines separate the groups) and sorted by activation rate within a group, least active on the left. "
          "Banding is a bright block at the trigger layer, and a decoder that writes from the trigger layer onwards.</p>")
    bounds = np.nonzero(np.diff(trigger[order]))[0] + 0.5

    def draw(fig):
        for i, (name, m) in enumerate((("encoder", enc), ("decoder", dec))):
            ax = fig.add_subplot(1, 2, i + 1)
            shown = m[order] / np.maximum(m[order].max(1, keepdims=True), 1e-12)
            im = ax.imshow(shown.T, aspect="auto", origin="lower", cmap="magma", interpolation="nearest", vmin=0, vmax=1)
            for b in bounds:
                ax.axvline(b, color="white", lw=0.6)
            ax.set_yticks(range(L), [str(v) for v in layers])
            ax.set(xlabel=f"{shown_label} by trigger layer, then rate", ylabel="layer", title=f"{name} block norms")
            fig.colorbar(im, ax=ax)

    r.figure("banding", draw, size=(11, 4), caption="Encoder and decoder block norms per layer, each latent relative to its largest block.")

    def draw_rates(fig):
        ax = fig.add_subplot(1, 2, 1)
        ax.hist(np.log10(rate[active]), bins=40)
        ax.set(xlabel="log10 activation rate (share of tokens it fires at)", ylabel="latents", title=f"activation rates ({int((~active).sum()):,} never active)")
        ax2 = fig.add_subplot(1, 2, 2)
        counts = [int((trigger[active] == l).sum()) for l in layers]
        ax2.bar(range(L), counts)
        ax2.set_xticks(range(L), [str(v) for v in layers])
        ax2.set(xlabel="trigger layer", ylabel="active latents", title="latents per trigger layer")

    r.figure("activation_rates", draw_rates, size=(10, 3.5), caption="Left: how often each active latent fires. Right: how many latents each layer triggers.")

    cos = _read(folder / "decoder_cosines.parquet")
    if cos is not None and cos.num_rows:
        r.add("<h3>Decoder cosines between layers</h3><p>cos(dec<sub>f,l</sub>, dec<sub>f,l+k</sub>): how alike the directions "
              "a latent writes at layers k apart are, averaged over every l and the most active latents (error bars: one "
              "standard deviation), overall and per trigger bucket. The residual stream copies information forward, so "
              "nearby blocks tend to agree; the question is how fast that falls with k.</p>")

        def draw_cos(fig):
            ax = fig.add_subplot(1, 1, 1)
            rows = cos.to_pylist()
            overall = [x for x in rows if x["trigger_layer"] is None]
            ax.errorbar([x["k"] for x in overall], [x["mean_cosine"] for x in overall], [x["std_cosine"] for x in overall],
                        fmt="o-", color="black", capsize=3, label="all (top latents)")
            for layer in layers:
                mine = [x for x in rows if x["trigger_layer"] == layer]
                if mine:
                    ax.plot([x["k"] for x in mine], [x["mean_cosine"] for x in mine], ".-", lw=1, label=f"trigger {layer}")
            ax.set(xlabel="k (captured layers apart)", ylabel="mean cosine", title="decoder block cosines")
            ax.legend(fontsize=7, ncol=2)

        r.figure("decoder_cosines", draw_cos, caption="Mean cosine between a latent's decoder blocks k layers apart.")
        r.add(_table_html(cos.filter(pc.is_null(cos.column("trigger_layer")))))
    _flow(r, folder, layers)


def _flow(r: Report, folder: Path, layers: list[int]) -> None:
    buckets = _read(folder / "flow_buckets.parquet")
    if buckets is None or buckets.num_rows == 0:
        return
    r.add("<h3>Information flow</h3><p>At a token where latent f fires, the layer-l residual is moved along f's decoder block "
          "dec<sub>f,l</sub> and the model's own map from layer l to l+k carries the move forward (a Jacobian-vector product "
          "at the real activations): c<sub>l,l+k,f</sub>. <b>Cosine</b>: its angle with dec<sub>f,l+k</sub> (1: the decoder "
          "follows the model's local linear pathway). <b>Strength</b>: c &middot; dec<sub>f,l+k</sub> / "
          "||dec<sub>f,l+k</sub>||&sup2; (1: the move at l produces exactly the block at l+k along it). Shown from each "
          "bucket's trigger layer, averaged over its most active latents and their tokens: is the flow strongest right "
          "after the trigger layer?</p>")
    rows = [x for x in buckets.to_pylist() if x["layer_from"] == x["trigger_layer"]]

    def draw(fig):
        for i, metric in enumerate(("mean_cosine", "mean_strength")):
            ax = fig.add_subplot(1, 2, i + 1)
            for layer in layers:
                mine = sorted((x for x in rows if x["trigger_layer"] == layer), key=lambda x: x["k"])
                if mine:
                    ax.plot([x["k"] for x in mine], [x[metric] for x in mine], "o-", ms=3, label=f"trigger {layer}")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(xlabel="k (from the trigger layer)", ylabel=metric.replace("_", " "), title=metric.split("_")[1])
            ax.legend(fontsize=7)

    r.figure("flow", draw, size=(10, 3.8), caption="Flow from each trigger bucket's trigger layer to the layers after it.")
    r.add(_table_html(pa.Table.from_pylist(rows), ["trigger_layer", "layer_from", "layer_to", "k", "mean_cosine", "mean_strength", "n_latents", "n_rows"]))
    text = _read(folder / "flow_text.parquet")
    if text is not None and text.num_rows:
        r.add("<h4>Token by token on the chosen text</h4>")
        r.add(_table_html(text.slice(0, 80), ["latent", "position", "token", "activation", "layer_from", "layer_to", "cosine", "strength"]))


def _layer_span(r: Report, runs: dict[Path, dict]) -> None:
    """How many layers a latent spans, for every analysed run given: where an MLSAE latent fires,
    where a concat latent writes (the fewest layers holding 90% of it)."""
    spans = {}
    for folder, meta in runs.items():
        lat = _read(folder / "analysis" / "latents.parquet")
        if lat is None or "n_layers_90" not in lat.column_names or latent_space_of(meta) == "per_layer":
            continue
        values = np.array([v for v in lat.column("n_layers_90").to_pylist() if v is not None])
        if len(values):
            spans[f"{folder.name} ({meta['sae']['arch']})"] = (values, len(meta["layers"]))
    if not spans:
        return
    r.add("<h2>How many layers a latent spans</h2><p>For each live latent, the fewest layers that hold 90% of it: of its "
          "activation summed over the analysed tokens for an MLSAE (where it fires), of its decoder's squared norm for a "
          "concat SAE (where it writes). Pass <code>--compare OTHER_RUN</code> to put the two systems side by side.</p>")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        top = max(L for _, L in spans.values())
        width = 0.8 / len(spans)
        for i, (name, (values, _)) in enumerate(spans.items()):
            frac = np.bincount(values, minlength=top + 1)[1:] / len(values)
            ax.bar(np.arange(1, top + 1) + (i - (len(spans) - 1) / 2) * width, frac, width=width,
                   label=f"{name}: mean {values.mean():.2f}")
        ax.set(xlabel="layers holding 90% of a latent", ylabel="fraction of live latents", title="layer span")
        ax.legend(fontsize=8)

    r.figure("layer_span", draw, caption="Layer span of the latents of each run.")


def _lens(r: Report, lens: dict) -> None:
    """A lens run: where its lens came from and, when ``mlsae lens eval`` measured it, its KL per
    layer against the logit lens."""
    r.add(f"<h2>Tuned lens</h2><p>Each layer's vector passes through a tuned-lens translator x' = x + W<sub>l</sub> x + "
          f"b<sub>l</sub> before the encoder, and the output is mapped back with (I + W<sub>l</sub>)<sup>-1</sup> (Lawson et "
          f"al. eqs. 8-9); the loss is computed on the translated vectors. Lens: <code>{html.escape(lens['path'])}</code> "
          f"({html.escape(lens['source'])}, sha256 {html.escape(lens['sha256'][:16])}...).</p>")
    path = Path(lens["path"]) / "kl.parquet"
    if not path.is_file():
        r.missing("lens measurement", f"mlsae lens eval --out {lens['path']} --data HELD_OUT_TEXT")
        return
    kl = pq.read_table(path)

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(kl.column("layer").to_pylist(), kl.column("kl_logit_lens").to_pylist(), "o-", ms=3, label="logit lens")
        ax.plot(kl.column("layer").to_pylist(), kl.column("kl_tuned_lens").to_pylist(), "s-", ms=3, label="tuned lens")
        ax.set(xlabel="layer", ylabel="KL(final || lens) (nats)", title="how far each layer's read-out is from the model's answer", yscale="log")
        ax.legend()

    r.figure("lens_kl", draw, caption="KL of the model's final next-token distribution from each layer's read-out, on held-out text.")
    r.add(_table_html(kl))


def _side_by_side(r: Report, runs: dict[Path, dict]) -> None:
    """The headline numbers of every run given, one row each (eval means and the variance ratio)."""
    rows = []
    for folder, meta in runs.items():
        ev = _read(folder / "eval.parquet")
        summary_path = folder / "analysis" / "summary.json"
        layers = json.loads(summary_path.read_text())["layers"] if summary_path.is_file() else {}
        mean = {c: ev.column(c).to_pylist()[-1] for c in ev.column_names} if ev is not None else {}
        rows.append({
            "run": folder.name, "arch": meta["sae"]["arch"], "lens": "yes" if meta.get("lens") else "no",
            "latents": meta["n_latents"], "k": meta["sae"]["k"], "fvu": mean.get("fvu"), "fvu_standardized": mean.get("fvu_standardized"),
            "delta_ce": mean.get("delta_ce"), "kl": mean.get("kl"), "dead_fraction": mean.get("dead_fraction"),
            "variance_ratio": layers.get("variance_ratio"), "variance_ratio_paper": layers.get("variance_ratio_paper"),
        })
    r.add("<h2>Runs side by side</h2><p>Means over layers from each run's <code>eval.parquet</code> and the variance ratio "
          "from its analysis (a dash: not measured yet).</p>" + _table_html(pa.Table.from_pylist(rows)))
