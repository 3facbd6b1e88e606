"""How reconstruction and the spread of latents over layers change with the expansion factor: a
table over the runs of one sweep, each evaluated (`mlsae eval`) and analysed (`mlsae analyze`).

    mlsae sweep --model smollm2 --data corpus/train --tokens 200000 --arch mlsae --expansion-factor 1 2 4 8 \\
        -k 32 --lr 4e-3 --ctx 256 --tokens-per-step 512 --micro-batch-tokens 512 --dead-tokens 50000 --out SWEEP
    for run in SWEEP/*/; do mlsae eval $run --data corpus/test --tokens 20000 --downstream-tokens 1000
                            mlsae analyze $run --data corpus/test --tokens 20000; done
    python benchmarks/sweep_expansion.py SWEEP

Prints a table and writes ``benchmarks/results/sweep_expansion.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
LAYER_KEYS = ("variance_ratio", "variance_ratio_paper", "mean_aggregated_variance", "mean_per_token_variance",
              "mean_layers_active_per_token", "multi_layer_fraction_per_token", "mean_layers_active_aggregated", "dead_fraction")


def row(run: Path) -> dict:
    meta = json.loads((run / "config.json").read_text())
    mean = next(r for r in pq.read_table(run / "eval.parquet").to_pylist() if r["layer"] == "mean")
    layers = json.loads((run / "analysis" / "summary.json").read_text())["layers"]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "run": run.name, "R": meta["sae"]["expansion_factor"], "latents": meta["n_latents"], "k": meta["sae"]["k"],
        "train_tokens": last["tokens"], "train_fvu_last_step": last["fvu"],
        "fvu": mean["fvu"], "fvu_standardized": mean["fvu_standardized"], "delta_ce": mean.get("delta_ce"),
        "dead_fraction_eval": mean["dead_fraction"], **{k: layers[k] for k in LAYER_KEYS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="the sweep's folder (its runs evaluated and analysed)")
    ap.add_argument("--json", default=str(RESULTS / "sweep_expansion.json"))
    args = ap.parse_args()
    runs = sorted((p for p in Path(args.sweep).iterdir() if (p / "analysis" / "summary.json").is_file()), key=lambda p: row(p)["R"])
    rows = [row(p) for p in runs]
    cols = [("R", "R"), ("latents", "latents"), ("fvu", "FVU"), ("fvu_standardized", "FVU std"), ("delta_ce", "dCE"),
            ("dead_fraction_eval", "dead"), ("variance_ratio", "var ratio"), ("variance_ratio_paper", "ratio (paper)"),
            ("mean_aggregated_variance", "agg var"), ("mean_per_token_variance", "tok var"),
            ("mean_layers_active_per_token", "layers/token")]
    print(" ".join(f"{h:>13}" for _, h in cols))
    for r in rows:
        print(" ".join(f"{r[k]:>13.4g}" if isinstance(r[k], float) else f"{r[k]:>13}" for k, _ in cols))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"sweep": Path(args.sweep).name, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
