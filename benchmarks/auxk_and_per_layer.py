"""The AuxK normalisation, and whether per-layer SAEs lose their latents to the budget or to
the settings.

    python benchmarks/auxk_and_per_layer.py --train-cache CACHE --heldout HELD_OUT [--tokens 200000]

First an MLSAE with the AuxK error divided by the error's own variance (``--auxk-norm error``,
as Gao et al. and the paper's code) against the default run of
``benchmarks/init_and_centring.py`` (divided by the input's variance), same recipe; the better
one (fewer dead latents at equal or better held-out FVU) is then used for the per-layer SAEs,
trained with the recipe's dead-latent window and with 4x that window. Prints a table and writes
``benchmarks/results/auxk_and_per_layer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from _runs import RESULTS, print_table, recipe_parser, run_variant, write_results
from init_and_centring import RECIPE

from mlsae.model import load_model

REFERENCE = "median, centring"  # the default settings, trained by init_and_centring.py


def better_auxk(by_input: dict, by_error: dict) -> str:
    """Fewer dead latents at equal or better held-out FVU (within 0.002) wins; else the default."""
    fewer_dead = by_error["heldout_dead_fraction"] < by_input["heldout_dead_fraction"]
    as_good = by_error["heldout_fvu_standardized"] <= by_input["heldout_fvu_standardized"] + 0.002
    return "error" if fewer_dead and as_good else "input"


def main() -> None:
    parser = recipe_parser(__doc__, "runs/auxk-and-per-layer", "auxk_and_per_layer.json")
    parser.add_argument("--reference", default=str(RESULTS / "init_and_centring.json"),
                        help="results of init_and_centring.py, holding the default run")
    args = parser.parse_args()
    reference = next(r for r in json.loads(Path(args.reference).read_text())["results"] if r["combo"] == REFERENCE)
    reference = {**reference, "combo": "mlsae, AuxK / input variance", "auxk_norm": "input"}
    model = load_model(json.loads((Path(args.train_cache) / "manifest.json").read_text())["model"], device="cpu")
    by_error = run_variant("mlsae, AuxK / error variance", {**RECIPE, "auxk_norm": "error"}, args, model)
    norm = better_auxk(reference, by_error)
    per_layer = {**RECIPE, "arch": "per-layer", "auxk_norm": norm}
    variants = {
        f"per-layer, AuxK / {norm} variance": per_layer,
        f"per-layer, AuxK / {norm} variance, 4x dead window": {**per_layer, "dead_tokens": 4 * RECIPE["dead_tokens"]},
    }
    results = [reference, by_error] + [run_variant(n, s, args, model) for n, s in variants.items()]
    print(f"better AuxK normalisation: {norm}")
    print_table(results)
    write_results(args.json, {**RECIPE, "better_auxk_norm": norm}, args, results)


if __name__ == "__main__":
    main()
