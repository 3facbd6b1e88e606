"""The ``mlsae`` command: one subcommand per stage, its flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from . import config as cfgmod
from .errors import MlsaeError


def run_cache(cfg: cfgmod.CacheConfig) -> None:
    from .activations import mb_per_1k_tokens, write_cache
    from .model import load_model
    from .text import check_source, data_windows

    check_source(cfg.data)
    model = load_model(cfg.model, cfg.model_dtype, cfg.device)
    manifest = write_cache(
        model,
        data_windows(cfg, model.tokenizer),
        cfg.out,
        cfg.tokens,
        cfg.layers,
        cfg.dtype,
        cfg.shard_tokens,
        cfg.windows_per_batch,
        cfg.exclude_first_position,
        cfg.overwrite,
        extra={"data": cfg.data, "split": cfg.split, "prepend_bos": cfg.prepend_bos},
    )
    cfgmod.save_json(Path(cfg.out) / "config.json", cfgmod.to_dict(cfg))
    rate = manifest["n_tokens"] / manifest["capture_seconds"]
    size = mb_per_1k_tokens(len(manifest["layers"]), manifest["d_model"], cfg.dtype)
    print(
        f"wrote {manifest['n_tokens']:,} tokens x {len(manifest['layers'])} layers to {cfg.out} "
        f"({rate:,.0f} tokens/s, {size:.2f} MB per 1k tokens as {cfg.dtype})"
    )


def _training(run: Callable, cfg):
    """Run a training command: Ctrl-C exits with 130 once the checkpoints are saved; under
    torchrun only rank 0 reports (None on the other ranks)."""
    from .dist import world

    try:
        result = run(cfg)
    except KeyboardInterrupt:
        raise SystemExit(130)
    return result if world().writes else None


def run_train(cfg: cfgmod.TrainConfig) -> None:
    from .train import train

    result = _training(train, cfg)
    if result is None:
        return
    print(
        f"trained {cfg.arch} on {result.get('tokens', 0):,} tokens: loss {result.get('loss', float('nan')):.4f}, "
        f"FVU {result.get('fvu', float('nan')):.4f}, dead {100 * result.get('dead_fraction', 0):.1f}%; saved in {cfg.out}"
    )


def run_sweep(cfg: cfgmod.SweepConfig) -> None:
    from .train import sweep

    results = _training(sweep, cfg)
    if results is None:
        return
    width = max(len(name) for name in results)
    print(f"{'run'.ljust(width)}  {'tokens':>10}  {'FVU':>7}  {'dead':>6}")
    for name, r in results.items():
        print(f"{name.ljust(width)}  {r.get('tokens', 0):>10,}  {r.get('fvu', float('nan')):>7.4f}  "
              f"{100 * r.get('dead_fraction', 0):>5.1f}%")
    print(f"{len(results)} runs saved in {cfg.out} (each a run folder, as if trained alone)")


def run_eval(cfg: cfgmod.EvalConfig) -> None:
    from .dist import device_for, world
    from .evaluate import check_layers, compare, default_downstream_tokens, evaluate, format_table
    from .model import resolve_device
    from .runs import cache_for, locate_run, require_data

    runs = [cfg.run] + list(cfg.compare or [])
    names = [Path(r).name for r in runs]
    if len(set(names)) != len(names):
        names = [str(r) for r in runs]
    metas = []
    for run in runs:  # every run and the data are checked before the model is loaded; evaluate() opens them
        _, meta, _ = locate_run(run, cfg.allow_unfinished)
        require_data(Path(run), meta, cfg.data)
        check_layers(Path(run), meta["layers"], cfg.layers)
        cache_for(meta, cfg.data)
        metas.append(meta)
    model = None
    w = world(resolve_device(cfg.device))  # under torchrun each process evaluates its share of the text
    device = device_for(cfg.device, w)
    say = print if w.writes else (lambda *_: None)
    downstream_tokens = default_downstream_tokens(cfg.tokens, cfg.downstream_tokens)
    if downstream_tokens > 0 or not (Path(cfg.data) / "manifest.json").is_file():
        from .model import load_model

        model = load_model(metas[0]["model"], device=device)
    tables = {}
    for name, run in zip(names, runs):
        out = Path(cfg.out) / Path(run).name if cfg.out and len(runs) > 1 else cfg.out
        say(f"evaluating {run}")
        tables[name] = evaluate(
            run, cfg.data, cfg.tokens, downstream_tokens, cfg.split, cfg.ctx, cfg.layers, model, device,
            cfg.batch_tokens, out, ablations=cfg.ablations, paper_definitions=cfg.paper_definitions,
            allow_unfinished=cfg.allow_unfinished, reuse_ablations=cfg.reuse_ablations,
        )
        shown = [c for c in ("layer", "fvu", "fvu_standardized", "fvu_lens_standardized", "fvu_paper", "mse", "l0", "l1", "dead_fraction", "delta_ce",
                             "delta_ce_paper", "kl", "kl_paper", "loss_recovered_zero") if c in tables[name].column_names]
        say(format_table(tables[name], shown))
    if len(runs) > 1 and w.writes:
        import pyarrow.parquet as pq

        table = compare(tables)
        folder = Path(cfg.out) if cfg.out else Path(cfg.run)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "compare.parquet")
        print(format_table(table))
        print(f"comparison written to {folder / 'compare.parquet'}")


def run_analyze(cfg: cfgmod.AnalyzeConfig) -> None:
    from .analyze import analyze

    summary = analyze(cfg.run, cfg.data, cfg.tokens, cfg.split, cfg.ctx, cfg.prompt or (), cfg.top_n, None, cfg.device,
                      cfg.batch_tokens, cfg.out, allow_unfinished=cfg.allow_unfinished,
                      joint=cfgmod.subset(cfg, cfgmod.JointAnalysisConfig))
    if not summary:  # under torchrun, rank 0 reports
        return
    print(headline(summary))
    print(f"tables written to {Path(cfg.out) if cfg.out else Path(cfg.run) / 'analysis'}")


def headline(summary: dict) -> str:
    """The paper's headline numbers from an analysis summary."""
    lay, drift = summary["layers"], summary["drift"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (
        f"mean adjacent-layer cosine {fmt(drift['mean_cosine'])} (centred {fmt(drift['mean_cosine_centred'])}); "
        f"variance ratio aggregated/per-token {fmt(lay['variance_ratio'])} (paper definition "
        f"{fmt(lay.get('variance_ratio_paper'))}); latents active at >1 layer: "
        f"{fmt(lay['multi_layer_fraction_aggregated'])} aggregated, {fmt(lay['multi_layer_fraction_per_token'])} per token"
    )


def run_report(cfg: cfgmod.ReportConfig) -> None:
    from .report import build_report

    print(f"report written to {build_report(cfg.run, cfg.out, cfg.compare or ())}")


def run_demo(cfg: cfgmod.DemoConfig) -> None:
    import time

    from .analyze import analyze
    from .evaluate import evaluate, format_table
    from .model import load_model
    from .report import build_report
    from .train import train

    started = time.perf_counter()
    out = Path(cfg.out)
    print("[1/5] loading the offline model (SmolLM2-135M)")
    model = load_model("smollm2", device=cfg.device)
    run = out / "smollm2-mlsae"
    print(f"[2/5] capturing activations and training an MLSAE on {cfg.tokens:,} tokens of builtin:pydocs")
    train(
        cfgmod.TrainConfig(
            model="smollm2", data="builtin:pydocs", split="train", ctx=256, tokens=cfg.tokens, expansion_factor=4, k=32,
            lr=4e-3, tokens_per_step=512, micro_batch_tokens=512, dead_tokens=max(1, cfg.tokens // 4),
            shuffle_buffer_mb=1024, checkpoint_tokens=cfg.tokens, device=cfg.device, out=str(run), overwrite=True,
        ),
        model=model,
    )
    print("[3/5] evaluating on held-out text")
    table = evaluate(run, "builtin:pydocs", cfg.eval_tokens, cfg.downstream_tokens, "test", model=model, device=cfg.device)
    print(format_table(table, ["layer", "fvu", "fvu_standardized", "l0", "dead_fraction", "delta_ce", "kl"]))
    print("[4/5] analysing")
    summary = analyze(run, "builtin:pydocs", cfg.eval_tokens, "test", model=model, device=cfg.device,
                      prompts=["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"])
    print(headline(summary))
    print("[5/5] writing the report")
    page = build_report(run)
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} minutes; open the report: {page.resolve()}")


def run_lens(cfg: cfgmod.LensConfig) -> None:
    from .lens import run_lens_command

    run_lens_command(cfg)


def run_export(cfg: cfgmod.ExportConfig) -> None:
    from .interop import export_run

    folders = export_run(cfg.run, cfg.format, cfg.out, cfg.overwrite)
    print(f"wrote {len(folders)} {cfg.format} SAE folder(s) to {cfg.out}: {', '.join(f.name for f in folders)}")


def run_import(cfg: cfgmod.ImportConfig) -> None:
    from .interop import import_bank, read_bank
    from .model import load_model

    fmt, saes = read_bank(cfg.source, cfg.format)  # the source checked before the model loads
    print(f"found {len(saes)} {fmt} SAE(s) for layers {[s.layer for s in saes]}; loading {cfg.model}")
    model = load_model(cfg.model, device="cpu")
    out = import_bank(cfg.source, model, cfg.out, fmt, ctx=cfg.ctx, overwrite=cfg.overwrite)
    print(f"wrote the per-layer run {out}: evaluate it with `mlsae eval {out} --data ...`")


def run_push(cfg: cfgmod.PushConfig) -> None:
    from .hub import push_to_hub

    print(f"uploaded {cfg.run} to {push_to_hub(cfg.run, cfg.repo_id, private=cfg.private)}")


def run_serve(cfg: cfgmod.ServeConfig) -> None:
    from .serve import serve

    serve(cfg.runs, cfg.host, cfg.port, cfg.device)


# name -> (config class, runner, one-line help)
COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "cache": (cfgmod.CacheConfig, run_cache, "Capture residual-stream activations to a disk cache."),
    "train": (cfgmod.TrainConfig, run_train, "Train a multi-layer (or per-layer) TopK sparse autoencoder."),
    "sweep": (cfgmod.SweepConfig, run_sweep, "Train several coders (arrangements x expansion factors x k x learning rates) from one activation stream: the model runs once."),
    "eval": (cfgmod.EvalConfig, run_eval, "Evaluate runs per layer: FVU, L0, L1, dead latents, delta CE, KL."),
    "analyze": (cfgmod.AnalyzeConfig, run_analyze, "The paper's analyses: drift, layer distributions, examples, geometry."),
    "report": (cfgmod.ReportConfig, run_report, "Write a static HTML report of a run, with figures."),
    "lens": (cfgmod.LensConfig, run_lens, "Train a tuned lens (lens train), or compare it with the logit lens on held-out text (lens eval)."),
    "export": (cfgmod.ExportConfig, run_export, "Write a run's coder as per-layer SAE folders for sparsify or SAELens."),
    "import": (cfgmod.ImportConfig, run_import, "Read per-layer SAEs saved by sparsify or SAELens as a per-layer run."),
    "push": (cfgmod.PushConfig, run_push, "Upload a finished run to the Hugging Face hub with a generated model card."),
    "serve": (cfgmod.ServeConfig, run_serve, "Explore runs in the browser: overview, latent pages and prompts (a local web app)."),
    "demo": (cfgmod.DemoConfig, run_demo, "Run the whole chain offline on SmolLM2 and the built-in corpus."),
}


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one line, naming the command and the argument, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(
        prog="mlsae", description="Multi-layer sparse autoencoders on the residual stream of language models."
    )
    parser.add_argument("--version", action="version", version=f"mlsae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        cfgmod.add_arguments(p, cls)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cls, runner, _ = COMMANDS[args.command]
    try:
        cfg = cfgmod.from_namespace(cls, args)
        cfgmod.validate(cfg)
        runner(cfg)
    except MlsaeError as e:
        print(f"mlsae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: still one line; MLSAE_DEBUG=1 shows the traceback
        if os.environ.get("MLSAE_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mlsae {args.command}: internal error: {type(e).__name__}: {first} (set MLSAE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
