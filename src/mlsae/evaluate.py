"""Evaluation per layer and averaged over layers, on held-out text (Lawson et al. Table 1).

Reconstruction metrics (cheap) and downstream metrics (costly: the rest of the model runs once
per layer and per variant) take separate token budgets. The downstream pass splices ONE layer
at a time, starting from the clean run's residual at that layer, so the logits of only one
variant are ever held in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .activations import check_finite
from .assets import cache_dir
from .config import save_json
from .dist import World, device_for, world
from .integrity import sha256
from .errors import MlsaeError
from .model import ResidualModel, load_model, resolve_device, special_token_ids
from .runs import check_model, held_out, open_cache_for, open_run, require_data
from .sae import SparseCoder
from .text import keep_mask
from .transforms import standardize


def check_layers(folder: Path, trained: Sequence[int], layers: Optional[Sequence[int]]) -> list[int]:
    """The layers to evaluate: all ``trained`` ones, or those asked for, each of which was trained."""
    if layers is None:
        return list(trained)
    extra = sorted(set(layers) - set(trained))
    if extra:
        raise MlsaeError(f"layer {extra[0]} was not trained in {folder} (its layers: {list(trained)})")
    return sorted(set(layers))


# --------------------------------------------------------------------------------------------
# Reconstruction metrics, accumulated in float64 over batches


@dataclass
class ReconstructionStats:
    n_layers: int
    n_latents: int
    per_layer_dictionaries: bool
    count: int = 0
    sums: dict = field(default_factory=dict)
    lens: Optional["ReconstructionStats"] = None

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        L = self.n_layers
        self.sums = {
            "x": z(L, 0), "x_std": z(L, 0),  # per-layer sum of vectors (sized on first batch)
            "sq": z(L), "sq_std": z(L),  # sum ||x||^2
            "err": z(L), "err_std": z(L),  # sum ||x - x_hat||^2
            "l0": z(L), "l1": z(L),
        }
        self.fired = torch.zeros(L, self.n_latents, dtype=torch.bool)

    def update(self, x: Tensor, x_hat: Tensor, top_acts: Tensor, top_idx: Tensor,
               lens_space: Optional[tuple[Tensor, Tensor]] = None) -> None:
        """x, x_hat: [tokens, layers, d] raw; top_acts/top_idx: [tokens, layers, k], the codes
        seen at each layer (:meth:`SparseCoder.codes_at_layers`: a joint code counts at every layer).
        ``lens_space``: the same pair through a run's tuned lens (columns ``fvu_lens`` and
        ``fvu_lens_standardized``, the latter the space a lens run's loss is computed in)."""
        if lens_space is not None:
            self.lens = self.lens or ReconstructionStats(self.n_layers, self.n_latents, self.per_layer_dictionaries)
            self.lens._update_errors(*lens_space)
        self._update_errors(x, x_hat)
        s = self.sums
        active = top_acts > 0
        s["l0"] += active.sum((0, 2)).double()
        s["l1"] += top_acts.double().sum((0, 2))
        layer = torch.arange(self.n_layers)[None, :, None].expand_as(top_idx)
        self.fired[layer[active].cpu(), top_idx[active].cpu()] = True
        self.count += x.shape[0]

    def _update_errors(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        xs, mean, std = standardize(x)
        xs_hat = (x_hat - mean) / std
        s = self.sums
        if s["x"].shape[1] == 0:
            s["x"] = torch.zeros(self.n_layers, x.shape[-1], dtype=torch.float64)
            s["x_std"] = torch.zeros_like(s["x"])
        s["x"] += x.sum(0)
        s["x_std"] += xs.sum(0)
        s["sq"] += x.pow(2).sum((0, 2))
        s["sq_std"] += xs.pow(2).sum((0, 2))
        s["err"] += (x - x_hat).pow(2).sum((0, 2))
        s["err_std"] += (xs - xs_hat).pow(2).sum((0, 2))

    def reduce(self, w: World) -> None:
        """Sum the processes' statistics (each counted its own batches): every one then holds the whole's."""
        if not w.distributed:
            return
        if self.lens is not None:
            self.lens.reduce(w)
        for key in self.sums:
            self.sums[key] = w.sum(self.sums[key].contiguous())
        self.fired = w.any(self.fired)
        self.count = int(w.sum(torch.tensor([self.count], dtype=torch.int64)).item())

    def layer_means(self) -> Tensor:
        """``[layers, d]``: the mean raw residual per layer (the mean-ablation replacement)."""
        return self.sums["x"] / max(self.count, 1)

    def table(self) -> dict[str, list]:
        """Per-layer columns, each with the mean over layers appended.

        ``fvu_paper`` is the paper definition: the raw error over sum (x - m)^2 where m is ONE
        scalar per layer, the mean of all of that layer's entries (Lawson et al.'s code), not
        the per-component mean; the same positions are counted.
        """
        s, n = self.sums, max(self.count, 1)
        var = s["sq"] - s["x"].pow(2).sum(1) / n  # sum ||x - mean||^2
        var_std = s["sq_std"] - s["x_std"].pow(2).sum(1) / n
        d = s["x"].shape[1] or 1
        dead = 1 - self.fired.double().mean(1)
        cols = {
            "fvu": (s["err"] / var).tolist(),
            "fvu_standardized": (s["err_std"] / var_std).tolist(),
            "mse": (s["err"] / (n * d)).tolist(),
            "l0": (s["l0"] / n).tolist(),
            "l1": (s["l1"] / n).tolist(),
            "dead_fraction": dead.tolist(),
        }
        var_scalar = s["sq"] - s["x"].sum(1).pow(2) / (n * d)  # sum (x - m)^2, m the layer's scalar mean
        cols["fvu_paper"] = (s["err"] / var_scalar).tolist()
        if self.lens is not None:
            self.lens.count = self.count
            lens = self.lens.table()
            cols["fvu_lens"], cols["fvu_lens_standardized"] = lens["fvu"][:-1], lens["fvu_standardized"][:-1]
        means = {k: sum(v) / len(v) for k, v in cols.items()}
        if not self.per_layer_dictionaries:  # one dictionary: dead means silent at every layer
            means["dead_fraction"] = float(1 - self.fired.any(0).double().mean())
        return {k: v + [means[k]] for k, v in cols.items()}


# --------------------------------------------------------------------------------------------
# Downstream metrics: splice one layer at a time


def _next_token_logp(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token at every position but the last."""
    return torch.log_softmax(logits[:, :-1].float(), -1)


def _ce_kl(logp: Tensor, clean_logp: Tensor, targets: Tensor, mask: Tensor) -> tuple[float, float, int]:
    """Summed next-token CE and KL(clean || this) over the positions that count."""
    m = mask[:, :-1]
    ce = -logp.gather(-1, targets[..., None]).squeeze(-1)[m].sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)[m].sum()
    return float(ce), float(kl), int(m.sum())


class AblationBaselines:
    """The zero- and mean-ablation sums of a downstream evaluation. They depend on the model, the
    text, the layers, the layer means and the batching, never on the coder, so they are measured
    once per such key and reused by later runs and by ``--compare``: a JSON file under the user
    cache (``$MLSAE_CACHE_DIR/ablations``, default ``~/.cache/mlsae/ablations``). A file that
    cannot be read is measured again."""

    VARIANTS = ("_zero", "_mean")

    def __init__(self, model: ResidualModel, windows: Sequence[Tensor], layers: Sequence[int], layer_means: Tensor,
                 exclude_first_position: bool, windows_per_batch: int):
        h = hashlib.sha256()
        h.update(json.dumps({"format": 1, "model": model.fingerprint(), "dtype": str(model.model.dtype),
                             "device": model.device.type, "layers": list(layers), "exclude_first": exclude_first_position,
                             "windows_per_batch": windows_per_batch, "lengths": [len(w) for w in windows]}).encode())
        for w in windows:
            h.update(w.to(torch.int64).cpu().numpy().tobytes())
        h.update(layer_means.detach().float().cpu().numpy().tobytes())
        self.layers = list(layers)
        self.path = cache_dir() / "ablations" / f"{h.hexdigest()[:32]}.json"

    def load(self) -> Optional[dict[str, Tensor]]:
        """The stored sums (``ce_zero``, ``kl_zero``, ``ce_mean``, ``kl_mean``, per layer), or None."""
        try:
            saved = json.loads(self.path.read_text())
            if saved["layers"] != self.layers:
                return None
            return {k: torch.tensor(v, dtype=torch.float64) for k, v in saved["sums"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, sums: dict[str, Tensor]) -> None:
        keep = {k: v.tolist() for k, v in sums.items() if k.endswith(self.VARIANTS)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_json(self.path, {"layers": self.layers, "sums": keep})
        except OSError:  # a read-only or full cache only costs the reuse
            pass


def downstream(
    model: ResidualModel,
    coder: SparseCoder,
    windows: Sequence[Tensor],
    layers: Sequence[int],
    layer_means: Tensor,
    exclude_first_position: bool,
    windows_per_batch: int,
    progress: bool = True,
    ablations: bool = True,
    paper_definitions: bool = False,
    reuse_ablations: bool = False,
    world: World = World(),
) -> dict[str, list]:
    """CE, delta CE, KL and loss recovered per layer, for spliced, zero- and mean-ablated residuals.

    Only positions that count are replaced (the first position and special tokens keep their
    clean residual: a coder is not trained on them); CE and KL are averaged over the positions
    that count, predicting the next token. ``ablations=False`` runs only the spliced variant (a
    third of the cost; no loss recovered). ``paper_definitions=True`` adds ``ce_paper``,
    ``delta_ce_paper`` and ``kl_paper``: the reconstruction replaces the residual at EVERY
    position, the first (attention sink) and special tokens included, and every position is
    scored, as Lawson et al.'s code does. ``reuse_ablations``: take the zero- and mean-ablation
    sums from :class:`AblationBaselines` when measured before (and store them when not), so only
    the coder's own splices run. Under torchrun (``world``) each process splices every
    world-size-th batch and the sums are added up.
    """
    device = model.device
    special = special_token_ids(model.tokenizer)
    col = [coder.layers.index(l) for l in layers]
    kinds = ("zero", "mean") if ablations else ()
    suffixes = [""] + [f"_{kind}" for kind in kinds] + (["_paper"] if paper_definitions else [])
    sums = {m + s: torch.zeros(len(layers), dtype=torch.float64) for s in suffixes for m in ("ce", "kl")}
    store = AblationBaselines(model, windows, layers, layer_means, exclude_first_position, windows_per_batch) \
        if ablations and reuse_ablations else None
    stored = store.load() if store is not None else None
    if world.distributed and int(world.sum(torch.tensor([stored is not None], dtype=torch.int64))) < world.size:
        stored = None  # every process measures them, unless every process found them
    if stored is not None:
        sums.update(stored)
        suffixes = [s for s in suffixes if s not in AblationBaselines.VARIANTS]
        tqdm.write(f"zero- and mean-ablation losses reused from {store.path}")
    clean = {"": [0.0, 0], "_paper": [0.0, 0]}  # summed CE and positions, per way of scoring
    groups: list[list[Tensor]] = []  # consecutive windows of one length, windows_per_batch at most
    for w in windows:
        if not groups or len(groups[-1]) == windows_per_batch or len(groups[-1][0]) != len(w):
            groups.append([])
        groups[-1].append(w)
    batches = [torch.stack(g) for g in groups][world.rank :: world.size]
    with tqdm(total=len(batches) * len(layers), desc="downstream (layers x batches)", disable=not progress) as bar:  # closed before an error is printed
        for ids in batches:
            ids = ids.to(device)
            masks = {"": keep_mask(ids, special, exclude_first_position), "_paper": torch.ones_like(ids, dtype=torch.bool)}
            resid = model.capture(ids, coder.layers)  # [batch, pos, layers, d]
            keep = masks[""]
            with torch.no_grad():
                recon = torch.zeros_like(resid)
                recon[keep] = coder(resid[keep].float()).x_hat.to(resid.dtype)
                recon_all = coder(resid.flatten(0, 1).float()).x_hat.to(resid.dtype).view_as(resid) if paper_definitions else None
            clean_logp = _next_token_logp(model.logits(ids))
            targets = ids[:, 1:]
            for how, mask in masks.items():
                c, _, n = _ce_kl(clean_logp, clean_logp, targets, mask)
                clean[how][0] += c
                clean[how][1] += n
            for j, (layer, ci) in enumerate(zip(layers, col)):
                for suffix in suffixes:
                    if suffix == "_paper":
                        replacement, mask = recon_all[:, :, ci], masks["_paper"]
                    elif suffix == "_zero":
                        replacement, mask = torch.zeros_like(resid[:, :, ci]), keep
                    elif suffix == "_mean":
                        replacement, mask = layer_means[ci].to(resid.dtype).expand_as(resid[:, :, ci]), keep
                    else:
                        replacement, mask = recon[:, :, ci], keep
                    spliced = torch.where(mask[..., None], replacement, resid[:, :, ci])
                    logp = _next_token_logp(model.logits_from(layer, spliced, ids))
                    ce, kl, _ = _ce_kl(logp, clean_logp, targets, mask)
                    del logp
                    sums["ce" + suffix][j] += ce
                    sums["kl" + suffix][j] += kl
                bar.update(1)
    if world.distributed:
        for key in sums:
            sums[key] = world.sum(sums[key])
        totals = world.sum(torch.tensor([clean[""][0], clean[""][1], clean["_paper"][0], clean["_paper"][1]], dtype=torch.float64))
        clean = {"": [float(totals[0]), int(totals[1])], "_paper": [float(totals[2]), int(totals[3])]}
    count = clean[""][1]
    if count == 0:
        raise MlsaeError("downstream evaluation saw no positions that count; use more tokens or a longer context")
    if store is not None and stored is None and world.writes:
        store.save(sums)
    world.barrier()  # the stored file is complete before any process looks for it again
    ce_clean = clean[""][0] / count
    out = {k: (v / (clean["_paper"][1] if k.endswith("_paper") else count)).tolist() for k, v in sums.items()}
    out["ce_clean"] = [ce_clean] * len(layers)
    out["delta_ce"] = [v - ce_clean for v in out["ce"]]
    if paper_definitions:
        ce_clean_paper = clean["_paper"][0] / clean["_paper"][1]
        out["ce_clean_paper"] = [ce_clean_paper] * len(layers)
        out["delta_ce_paper"] = [v - ce_clean_paper for v in out["ce_paper"]]
    for kind in kinds:
        out[f"loss_recovered_{kind}"] = [
            (a - s) / (a - ce_clean) if abs(a - ce_clean) > 1e-12 else None for a, s in zip(out[f"ce_{kind}"], out["ce"])
        ]
    for k, v in out.items():
        vals = [x for x in v if x is not None]
        v.append(sum(vals) / len(vals) if vals else None)
    return out


# --------------------------------------------------------------------------------------------
# The whole evaluation of one run


def evaluate(
    run_dir: str | Path,
    data: Optional[str],
    tokens: int = 20_000,
    downstream_tokens: Optional[int] = None,
    split: str = "test",
    ctx: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    model: Optional[ResidualModel] = None,
    device: str = "auto",
    batch_tokens: int = 4096,
    out: Optional[str | Path] = None,
    progress: bool = True,
    ablations: bool = True,
    paper_definitions: bool = False,
    allow_unfinished: bool = False,
    reuse_ablations: bool = True,
) -> pa.Table:
    """Evaluate a run; writes ``eval.parquet`` and ``eval.json`` into ``out`` (default: the run).

    ``downstream_tokens`` None means the smaller of 4,000 and ``tokens``: a small evaluation
    stays small.
    """
    started = time.perf_counter()
    downstream_tokens = default_downstream_tokens(tokens, downstream_tokens)
    ranks = world(resolve_device(device))
    dev = resolve_device(device_for(device, ranks))
    progress = progress and ranks.writes
    run = open_run(run_dir, dev, allow_unfinished)
    require_data(run.folder, run.meta, data)
    layers = check_layers(run.folder, run.coder.layers, layers)
    cache = open_cache_for(run, data)
    if model is None and (downstream_tokens > 0 or cache is None):
        model = load_model(cache.manifest["model"] if cache else run.meta["model"], device=str(dev))
    if model is not None:
        check_model(run, model)
    excl = run.meta.get("train", {}).get("exclude_first_position", True)
    stats = ReconstructionStats(len(run.coder.layers), run.coder.n_latents, run.coder.latent_space == "per_layer")
    source = held_out(run, model, cache, data, split, ctx, batch_tokens)
    windows = source.windows
    counted = 0  # over all processes; each reads every world-size-th part
    with tqdm(total=tokens, unit="tok", desc="reconstruction", disable=not progress) as bar:  # closed before an error is printed
        for j, part in enumerate(source.parts):
            take = min(part.n_rows, tokens - counted)
            counted += take
            bar.update(take)
            if j % ranks.size != ranks.rank:
                if counted >= tokens:
                    break
                continue
            batch = part.load().slice(0, take)
            x = batch.acts.to(dev, torch.float32)
            check_finite(x, "evaluation data", run.coder.layers)
            with torch.no_grad():
                o = run.coder(x)
            acts, idx = run.coder.codes_at_layers(o.top_acts, o.top_idx)  # L0, L1 and dead per layer
            lens = run.coder.lens_space(x, o.x_hat)
            stats.update(x.cpu(), o.x_hat.cpu(), acts.cpu(), idx.cpu(), None if lens is None else (lens[0].cpu(), lens[1].cpu()))
            if counted >= tokens:
                break
    stats.reduce(ranks)
    if stats.count == 0:
        raise MlsaeError(f"evaluation data {data} gave no tokens")
    recon = stats.table()
    sel = [run.coder.layers.index(l) for l in layers] + [len(run.coder.layers)]
    columns: dict[str, list] = {"layer": [str(l) for l in layers] + ["mean"]}
    for k, v in recon.items():
        columns[k] = [v[i] for i in sel]
    if len(layers) != len(run.coder.layers):  # the mean over the selected layers only
        for k in recon:
            vals = columns[k][:-1]
            columns[k][-1] = sum(vals) / len(vals)
    ds_seconds = 0.0
    if downstream_tokens > 0:
        ds_started = time.perf_counter()
        special = special_token_ids(model.tokenizer)
        chosen, counted = [], 0
        for w in windows:
            if counted >= downstream_tokens:
                break
            keep = keep_mask(w[None], special, excl)[0]
            scored = int(keep[:-1].sum())  # the last position has no next token to predict
            if counted + scored > downstream_tokens:  # causal: a window's prefix scores exactly as in full
                last = int(keep.nonzero()[downstream_tokens - counted - 1])
                w, scored = w[: last + 2], downstream_tokens - counted  # + the token the last prediction targets
            chosen.append(w)
            counted += scored
        ctx_len = int(chosen[0].shape[0])
        ds = downstream(model, run.coder, chosen, layers, stats.layer_means().float().to(dev), excl,
                        max(1, batch_tokens // ctx_len // 2), progress, ablations, paper_definitions, reuse_ablations, ranks)
        columns.update(ds)
        ds_seconds = time.perf_counter() - ds_started
    table = pa.table(columns)
    if not ranks.writes:  # under torchrun, rank 0 writes the tables
        return table
    out = Path(out) if out else run.folder
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "eval.parquet")
    summary = {
        "run": str(run.folder),
        "data": data,
        "tokens": stats.count,
        "downstream_tokens": downstream_tokens,
        "seconds": time.perf_counter() - started,
        "downstream_seconds": ds_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "fvu_minimised_in_training": run.coder.cfg.loss_space,
        "transforms": run.coder.transform.describe(),
        "eval_parquet_sha256": sha256(out / "eval.parquet"),
    }
    save_json(out / "eval.json", summary)
    return table


def default_downstream_tokens(tokens: int, downstream_tokens: Optional[int]) -> int:
    if downstream_tokens is None:
        return min(DOWNSTREAM_TOKENS, tokens)
    if downstream_tokens < 0:
        raise MlsaeError(f"downstream_tokens {downstream_tokens}: expected 0 (skip) or a positive number")
    return downstream_tokens


DOWNSTREAM_TOKENS = 4_000
"""The downstream budget when none is given (capped by the reconstruction budget)."""


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_table(table: pa.Table, columns: Optional[Sequence[str]] = None) -> str:
    """A plain fixed-width text table."""
    cols = columns or table.column_names
    rows = [[_fmt(v) for v in table.column(c).to_pylist()] for c in cols]
    widths = [max(len(c), *(len(v) for v in r)) for c, r in zip(cols, rows)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for i in range(table.num_rows):
        lines.append("  ".join(r[i].rjust(w) for r, w in zip(rows, widths)))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def compare(tables: dict[str, pa.Table], columns: Sequence[str] = ("fvu", "delta_ce", "kl", "l0")) -> pa.Table:
    """Side by side, per layer: one column per (metric, run)."""
    first = next(iter(tables.values()))
    out = {"layer": first.column("layer").to_pylist()}
    for metric in columns:
        for name, t in tables.items():
            if metric in t.column_names:
                if t.column("layer").to_pylist() != out["layer"]:
                    raise MlsaeError(f"runs evaluated on different layers cannot be compared ({name})")
                out[f"{metric}[{name}]"] = t.column(metric).to_pylist()
    return pa.table(out)

