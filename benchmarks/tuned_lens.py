"""An MLSAE with and without a tuned lens: the same recipe, compared on held-out data.

    mlsae lens train --model smollm2 --data TRAIN_TEXT --ctx 256 --tokens 32000 --windows-per-batch 2 --out LENS
    mlsae lens eval  --model smollm2 --data HELD_OUT --ctx 256 --tokens 4000 --out LENS
    python benchmarks/tuned_lens.py --train-cache CACHE --heldout HELD_OUT --lens LENS

Both variants use the README's small-budget recipe (the defaults for the start and centring);
the lens variant translates every layer before the encoder (Lawson et al. eqs. 8-9). Each is
trained from the cache, evaluated (FVU in the model's space and in the lens's, delta CE) and
analysed (the layer-variance ratio, read through the lens). Prints a table, and writes
``benchmarks/results/tuned_lens.json`` with the lens's KL per layer (logit lens against tuned
lens, from ``lens eval``) and its training time.
"""

from __future__ import annotations

import json
from pathlib import Path

from _runs import COLUMNS, print_table, recipe_parser, run_variant, write_results

from mlsae.model import load_model

RECIPE = dict(expansion_factor=4, k=32, ctx=256, lr=4e-3, tokens_per_step=512, micro_batch_tokens=512,
              dead_tokens=50_000, shuffle_buffer_mb=2048, device="cpu")


def main() -> None:
    parser = recipe_parser(__doc__, "runs/tuned-lens", "tuned_lens.json")
    parser.add_argument("--lens", required=True, help="the lens folder (mlsae lens train)")
    args = parser.parse_args()
    variants = {"no lens": {}, "tuned lens": dict(lens=args.lens)}
    model = load_model(json.loads((Path(args.train_cache) / "manifest.json").read_text())["model"], device="cpu")
    chosen = [n for i, n in enumerate(variants) if args.only is None or str(i) in args.only]
    results = [run_variant(n, {**RECIPE, **variants[n]}, args, model) for n in chosen]
    print_table(results, COLUMNS[:3] + ["heldout_fvu_lens_standardized"] + COLUMNS[3:])
    if args.only is None:
        lens = Path(args.lens)
        recipe = {**RECIPE, "lens_training": json.loads((lens / "train.json").read_text())}
        if (lens / "kl.parquet").is_file():
            import pyarrow.parquet as pq

            recipe["lens_kl_per_layer"] = pq.read_table(lens / "kl.parquet").to_pylist()
        write_results(args.json, recipe, args, results)


if __name__ == "__main__":
    main()
