"""Shared by the benchmarks that train variants of one recipe and compare them on held-out data.

Each variant is trained from an activation cache, evaluated (``mlsae eval``: FVU raw and
standardised, dead latents, delta CE) and analysed (``mlsae analyze``: the layer-variance
ratio); its numbers go to ``VARIANT/combo.json``, so a finished variant is not run again when a
script is stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlsae.analyze import analyze
from mlsae.config import TrainConfig
from mlsae.evaluate import evaluate
from mlsae.train import train

RESULTS = Path(__file__).parent / "results"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def recipe_parser(doc: str, out: str, json_name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--train-cache", required=True, help="activation cache of the training text")
    parser.add_argument("--heldout", required=True, help="held-out text, or a cache of it")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens per variant")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens for FVU and the analyses")
    parser.add_argument("--downstream-tokens", type=int, default=4_000, help="held-out tokens for delta CE")
    parser.add_argument("--paper-definitions", action="store_true", help="also the paper's delta CE and KL (costs a splice more)")
    parser.add_argument("--out", default=out, help="folder for the runs")
    parser.add_argument("--only", nargs="*", help="run only these variants (by position)")
    parser.add_argument("--json", default=str(RESULTS / json_name))
    return parser


def run_variant(name: str, settings: dict, args, model) -> dict:
    """Train, evaluate and analyse one variant (``settings``: TrainConfig fields); its numbers."""
    folder = Path(args.out) / slug(name)
    result_file = folder / "combo.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    train(TrainConfig(cache=args.train_cache, tokens=args.tokens, out=str(folder), overwrite=True, **settings))
    train_seconds = time.perf_counter() - started
    table = evaluate(folder, args.heldout, args.eval_tokens, args.downstream_tokens, model=model, device="cpu",
                     ablations=False, paper_definitions=args.paper_definitions)
    summary = analyze(folder, args.heldout, args.eval_tokens, model=model, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    mean = {c: table.column(c).to_pylist()[-1] for c in table.column_names if c != "layer"}
    result = {
        "combo": name,
        **{k: settings[k] for k in ("arch", "b_pre_init", "center_layers", "auxk_norm", "dead_tokens", "lens") if k in settings},
        "initial_fvu_train": config["init"]["fvu"],
        "final_fvu_train": last["fvu"],
        "dead_fraction_train": last["dead_fraction"],
        "heldout_fvu_raw": mean["fvu"],
        "heldout_fvu_standardized": mean["fvu_standardized"],
        "heldout_fvu_paper": mean.get("fvu_paper"),
        "heldout_fvu_lens": mean.get("fvu_lens"),
        "heldout_fvu_lens_standardized": mean.get("fvu_lens_standardized"),
        "heldout_dead_fraction": mean["dead_fraction"],
        "heldout_delta_ce": mean.get("delta_ce"),
        "heldout_kl": mean.get("kl"),
        "heldout_delta_ce_paper": mean.get("delta_ce_paper"),
        "heldout_kl_paper": mean.get("kl_paper"),
        "variance_ratio": summary["layers"]["variance_ratio"],
        "variance_ratio_paper": summary["layers"].get("variance_ratio_paper"),
        "train_seconds": train_seconds,
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


COLUMNS = ["initial_fvu_train", "final_fvu_train", "heldout_fvu_raw", "heldout_fvu_standardized", "heldout_delta_ce",
           "heldout_dead_fraction", "dead_fraction_train", "variance_ratio", "train_seconds"]


def print_table(results: list[dict], columns: list[str] = COLUMNS) -> None:
    width = max(len(r["combo"]) for r in results)
    print("variant".ljust(width) + "".join(f"  {c[:18]:>18}" for c in columns))
    for r in results:
        cells = [f"  {r[c]:>18.4f}" if r.get(c) is not None else f"  {'-':>18}" for c in columns]
        print(r["combo"].ljust(width) + "".join(cells))


def write_results(path: str, recipe: dict, args, results: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"recipe": recipe, "tokens": args.tokens, "eval_tokens": args.eval_tokens,
                                      "downstream_tokens": args.downstream_tokens, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
