"""`mlsae train` in one process against torchrun with N processes (gloo on CPU), same cache and recipe.

    python benchmarks/bench_dist.py --cache CACHE [--tokens 20480] [--nproc 2] [--splits]

Each is launched as a user would (one process with all the machine's threads; N processes with
an equal share of them each) and timed from its metrics (tokens/s after the start). ``--splits``
also times the coder split over the processes instead of replicated: per-layer SAEs replicated
against ``--distribute-layers``, and the MLSAE with ``--shard-latents``. Prints a table and writes
``benchmarks/results/dist.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RECIPE = ["--expansion-factor", "4", "-k", "32", "--lr", "4e-3", "--tokens-per-step", "512", "--micro-batch-tokens", "512",
          "--dead-tokens", "50000", "--shuffle-buffer-mb", "512", "--device", "cpu", "--no-verify-cache"]


def run(nproc: int, cache: str, tokens: int, out: Path, extra: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    args = ["train", "--cache", cache, "--tokens", str(tokens), "--out", str(out), *RECIPE, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mlsae.cli", *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "mlsae.cli", *args]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"processes": nproc, "flags": " ".join(extra) or "mlsae", "wall_seconds": wall, "tokens_per_s": metrics[-1]["tokens_per_s"],
            "final_fvu": metrics[-1]["fvu"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--tokens", type=int, default=20_480)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--splits", action="store_true", help="also time --distribute-layers and --shard-latents")
    ap.add_argument("--json", default=str(RESULTS / "dist.json"))
    args = ap.parse_args()
    plans = [(1, ()), (args.nproc, ())]
    if args.splits:
        plans += [(1, ("--arch", "per-layer")), (args.nproc, ("--arch", "per-layer")),
                  (args.nproc, ("--arch", "per-layer", "--distribute-layers")), (args.nproc, ("--shard-latents",))]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, args.cache, args.tokens, Path(tmp) / f"p{i}", extra) for i, (n, extra) in enumerate(plans)]
    for r in rows:  # against one process with the same arrangement
        base = next(b for b in rows if b["processes"] == 1 and ("per-layer" in b["flags"]) == ("per-layer" in r["flags"]))
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    print(f"{'processes':>9} {'flags':<36} {'tokens/s':>9} {'x 1 proc':>8} {'wall s':>7} {'final FVU':>9}")
    for r in rows:
        print(f"{r['processes']:>9} {r['flags']:<36} {r['tokens_per_s']:>9.0f} {r['speedup']:>8.2f} {r['wall_seconds']:>7.1f} "
              f"{r['final_fvu']:>9.4f}")
    meta = {"cpus": os.cpu_count(), "tokens": args.tokens, "recipe": RECIPE}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
