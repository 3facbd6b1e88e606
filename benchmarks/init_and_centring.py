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

import json
from pathlib import Path

from _runs import print_table, recipe_parser, run_variant, write_results

from mlsae.model import load_model

COMBOS = {
    "zero, no centring (the paper)": dict(b_pre_init="zero", center_layers=False),
    "median, no centring": dict(b_pre_init="geometric_median", center_layers=False),
    "zero, centring": dict(b_pre_init="zero", center_layers=True),
    "median, centring": dict(b_pre_init="geometric_median", center_layers=True),
}
RECIPE = dict(expansion_factor=4, k=32, ctx=256, lr=4e-3, tokens_per_step=512, micro_batch_tokens=512,
              dead_tokens=50_000, shuffle_buffer_mb=2048, device="cpu")


def main() -> None:
    parser = recipe_parser(__doc__, "runs/init-and-centring", "init_and_centring.json")
    args = parser.parse_args()
    model = load_model(json.loads((Path(args.train_cache) / "manifest.json").read_text())["model"], device="cpu")
    chosen = [n for i, n in enumerate(COMBOS) if args.only is None or str(i) in args.only]
    results = [run_variant(n, {**RECIPE, **COMBOS[n]}, args, model) for n in chosen]
    print_table(results)
    if args.only is None:
        write_results(args.json, RECIPE, args, results)


if __name__ == "__main__":
    main()
