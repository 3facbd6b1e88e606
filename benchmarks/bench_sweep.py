"""One stream, many coders: `mlsae sweep` of N coders against N separate `mlsae train` runs.

    python benchmarks/bench_sweep.py --cache CACHE --data TEXT [--tokens 8192] [--n 4] [--expansion-factor 4]

The N coders differ in their learning rate only (the same size, so each costs the same). Timed
in one process with the model loaded once (so a separate run is not charged the model's
loading): the stream alone (the language model's capture, the floor of a live run), N separate
runs and one sweep, live from TEXT and from CACHE. Prints a table and writes
``benchmarks/results/sweep.json``; the ratios are the figures to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mlsae.config import SweepConfig, TrainConfig
from mlsae.model import load_model
from mlsae.stream import ActivationStream
from mlsae.train import sweep, train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="an activation cache (mlsae cache) of SmolLM2 or another model")
    ap.add_argument("--data", required=True, help="text for the live runs")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--n", type=int, default=4, help="coders per sweep")
    ap.add_argument("--expansion-factor", type=int, default=4)
    ap.add_argument("--json", default=str(RESULTS / "sweep.json"))
    args = ap.parse_args()
    manifest = json.loads((Path(args.cache) / "manifest.json").read_text())
    model = load_model(manifest["model"], device="cpu")
    lrs = [4e-3 / 2**i for i in range(args.n)]
    recipe = dict(expansion_factor=args.expansion_factor, k=32, ctx=manifest["ctx"], tokens=args.tokens, tokens_per_step=512,
                  micro_batch_tokens=512, init_tokens=2048, dead_tokens=50_000, shuffle_buffer_mb=256, device="cpu",
                  checkpoint_tokens=10**9)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, where in (("live", dict(data=args.data)), ("cache", dict(cache=args.cache))):
            if source == "live":
                stream = ActivationStream(TrainConfig(**recipe, **where), model)
                started, seen = time.perf_counter(), 0
                for batch in stream.batches(512):
                    seen += len(batch)
                    if seen >= args.tokens:
                        break
                rows.append({"source": source, "what": "the stream alone (capture)", "seconds": time.perf_counter() - started})
            started = time.perf_counter()
            for i, lr in enumerate(lrs):
                train(TrainConfig(**recipe, **where, lr=lr, out=f"{tmp}/{source}-alone-{i}"), model=model)
            rows.append({"source": source, "what": f"{args.n} separate runs", "seconds": time.perf_counter() - started})
            started = time.perf_counter()
            sweep(SweepConfig(**{**recipe, "expansion_factor": [args.expansion_factor], "k": [32]}, **where, lr=lrs,
                              out=f"{tmp}/{source}-sweep"), model=model)
            rows.append({"source": source, "what": f"one sweep of {args.n}", "seconds": time.perf_counter() - started})
    for r in rows:
        r["coders_x_tokens_per_s"] = (1 if "alone (capture)" in r["what"] else args.n) * args.tokens / r["seconds"]
    for source in ("live", "cache"):
        alone, swept = (next(r for r in rows if r["source"] == source and r["what"].startswith(w)) for w in (f"{args.n} sep", "one sw"))
        swept["speedup_vs_separate"] = alone["seconds"] / swept["seconds"]
    print(f"{'source':<7} {'what':<28} {'seconds':>8} {'coder-tokens/s':>15} {'speed-up':>9}")
    for r in rows:
        print(f"{r['source']:<7} {r['what']:<28} {r['seconds']:>8.1f} {r['coders_x_tokens_per_s']:>15.0f} "
              f"{r.get('speedup_vs_separate', float('nan')):>9.2f}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "model": manifest["model"],
            "layers": len(manifest["layers"]), "n": args.n, "recipe": recipe, "lrs": lrs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
