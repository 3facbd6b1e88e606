"""Where b_pre starts x per-layer centring: train the four combinations with one recipe and
compare them on held-out data.

    python benchmarks/init_and_centring.py --train-cache CACHE --heldout HELD_OUT [--tokens 200000]

CACHE is an activation cache (`mlsae cache`) of the training text; HELD_OUT is held-out text or
a cache of it. Each combination is trained with the README's small-budget recipe, then
evaluated (FVU raw and standardised, dead latents, delta CE) and analysed (the layer-variance
ratio). A combination whose results already exist is not run again, so the script can be
stopped and restarted. Prints a table and writes ``benchmarks/results/init_and_centring.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlsae.analyze import analyze
from mlsae.config import TrainConfig
from mlsae.evaluate import evaluate
from mlsae.model import load_model
from mlsae.train import train

COMBOS = {
    "zero, no centring (the paper)": dict(b_pre_init="zero", center_layers=False),
    "median, no centring": dict(b_pre_init="geometric_median", center_layers=False),
    "zero, centring": dict(b_pre_init="zero", center_layers=True),
    "median, centring": dict(b_pre_init="geometric_median", center_layers=True),
}
RECIPE = dict(expansion_factor=4, k=32, ctx=256, lr=4e-3, tokens_per_step=512, micro_batch_tokens=512,
              dead_tokens=50_000, shuffle_buffer_mb=2048, device="cpu")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_combo(name: str, settings: dict, args, model) -> dict:
    folder = Path(args.out) / slug(name)
    result_file = folder / "combo.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    train(TrainConfig(cache=args.train_cache, tokens=args.tokens, out=str(folder), overwrite=True, **RECIPE, **settings))
    train_seconds = time.perf_counter() - started
    table = evaluate(folder, args.heldout, args.eval_tokens, args.downstream_tokens, model=model, device="cpu",
                     ablations=False)
    summary = analyze(folder, args.heldout, args.eval_tokens, model=model, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    mean = {c: table.column(c).to_pylist()[-1] for c in table.column_names if c != "layer"}
    result = {
        "combo": name,
        **settings,
        "initial_fvu_train": config["init"]["fvu"],
        "final_fvu_train": last["fvu"],
        "dead_fraction_train": last["dead_fraction"],
        "heldout_fvu_raw": mean["fvu"],
        "heldout_fvu_standardized": mean["fvu_standardized"],
        "heldout_dead_fraction": mean["dead_fraction"],
        "heldout_delta_ce": mean.get("delta_ce"),
        "heldout_kl": mean.get("kl"),
        "variance_ratio": summary["layers"]["variance_ratio"],
        "train_seconds": train_seconds,
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-cache", required=True, help="activation cache of the training text")
    parser.add_argument("--heldout", required=True, help="held-out text, or a cache of it")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens per combination")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens for FVU and the analyses")
    parser.add_argument("--downstream-tokens", type=int, default=4_000, help="held-out tokens for delta CE")
    parser.add_argument("--out", default="runs/init-and-centring", help="folder for the four runs")
    parser.add_argument("--only", nargs="*", help="run only these combinations (by position, 0-3)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "init_and_centring.json"))
    args = parser.parse_args()
    model = load_model(json.loads((Path(args.train_cache) / "manifest.json").read_text())["model"], device="cpu")
    chosen = [n for i, n in enumerate(COMBOS) if args.only is None or str(i) in args.only]
    results = [run_combo(n, COMBOS[n], args, model) for n in chosen]
    cols = ["initial_fvu_train", "final_fvu_train", "heldout_fvu_raw", "heldout_fvu_standardized", "heldout_delta_ce",
            "heldout_dead_fraction", "dead_fraction_train", "variance_ratio", "train_seconds"]
    width = max(len(r["combo"]) for r in results)
    print("combination".ljust(width) + "".join(f"  {c[:18]:>18}" for c in cols))
    for r in results:
        print(r["combo"].ljust(width) + "".join(f"  {r[c]:>18.4f}" if r[c] is not None else f"  {'-':>18}" for c in cols))
    if args.only is None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"recipe": RECIPE, "tokens": args.tokens, "eval_tokens": args.eval_tokens,
                                               "downstream_tokens": args.downstream_tokens, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
