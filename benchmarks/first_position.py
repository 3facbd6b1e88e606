"""Why the first position of each window is left out: its share of each layer's variance, and
what it does to the raw FVU of a trained coder.

    python benchmarks/first_position.py RUN_DIR --data TEXT [--tokens 4096] [--ctx 256]

Prints a table and writes benchmarks/results/first_position.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mlsae.runs import open_run
from mlsae.model import load_model, special_token_ids
from mlsae.sae import fvu_per_layer
from mlsae.text import iter_documents, keep_mask, pack_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()
    run = open_run(args.run)
    model = load_model(run.meta["model"], device="cpu")
    windows = list(pack_windows(iter_documents(args.data), model.tokenizer, args.ctx))[: max(1, args.tokens // args.ctx)]
    ids = torch.stack(windows)
    acts = torch.cat([model.capture(ids[i : i + 4], run.coder.layers) for i in range(0, len(ids), 4)])  # [w, pos, L, d]
    special = special_token_ids(model.tokenizer)
    rows = {}
    for name, keep in (("excluded", keep_mask(ids, special, True)), ("included", keep_mask(ids, special, False))):
        x = acts[keep]
        with torch.no_grad():
            x_hat = torch.cat([run.coder(x[i : i + 2048]).x_hat for i in range(0, len(x), 2048)])
        rows[name] = fvu_per_layer(x.double(), x_hat.double()).tolist()
    first = acts[:, 0]  # [w, L, d]
    rest = acts[:, 1:].flatten(0, 1)
    allx = acts.flatten(0, 1)
    centred = (allx - allx.mean(0)).pow(2).sum(-1)  # [tokens, L]
    share = ((first - allx.mean(0)).pow(2).sum(-1).sum(0) / centred.sum(0)).tolist()
    norms = {"first": first.norm(dim=-1).median(0).values.tolist(), "rest": rest.norm(dim=-1).median(0).values.tolist()}
    print(f"{'layer':>5} {'|x| pos 0':>10} {'|x| others':>10} {'var share pos 0':>16} {'FVU excl.':>10} {'FVU incl.':>10}")
    for j, layer in enumerate(run.coder.layers):
        print(f"{layer:>5} {norms['first'][j]:>10.0f} {norms['rest'][j]:>10.0f} {share[j]:>16.3f} {rows['excluded'][j]:>10.3f} {rows['included'][j]:>10.3f}")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f" mean {'':>10} {'':>10} {mean(share):>16.3f} {mean(rows['excluded']):>10.3f} {mean(rows['included']):>10.3f}")
    out = Path(__file__).parent / "results" / "first_position.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "layers": run.coder.layers, "median_norm": norms, "variance_share_first": share,
                               "fvu_raw": rows, "tokens": int(ids.numel())}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
