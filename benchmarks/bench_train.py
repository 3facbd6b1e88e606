"""`mlsae train` end to end: live and from a cache, against the language model's capture alone
(the floor), and the peak memory of training from caches of growing size.

    python benchmarks/bench_train.py [--tokens 8192] [--memory-tokens 8192 32768]

Speed: in one process with the model loaded once, the same text and recipe, (1) the capture
alone (the model's forward pass with every layer's residual kept: what a live run cannot beat),
(2) `train` live, (3) `mlsae cache` then `train --cache`. Tokens/s of training are the run's
own (from its metrics, after the start). Memory: `mlsae train --cache` launched as a user would,
on caches of each size in --memory-tokens with the same recipe and shuffle buffer, and the peak
resident memory of that process (which must not grow with the cache). Prints a table and
writes ``benchmarks/results/train.json``.
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

import torch

from mlsae.activations import write_cache
from mlsae.config import TrainConfig
from mlsae.model import load_model
from mlsae.text import iter_documents, pack_windows
from mlsae.train import train

RESULTS = Path(__file__).parent / "results"
RECIPE = dict(expansion_factor=4, k=32, lr=4e-3, ctx=256, tokens_per_step=512, micro_batch_tokens=512, dead_tokens=50_000,
              shuffle_buffer_mb=64, device="cpu")


def flags(recipe: dict) -> list[str]:
    out = []
    for k, v in recipe.items():
        if k != "ctx":
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of ``cmd`` (a fresh process measuring its one child)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def speed(args, model, windows, tmp: Path) -> list[dict]:
    """Training live, then caching and training from the cache: tokens/s of each."""
    rows = []
    live = train(TrainConfig(model=args.model, data=args.data, tokens=args.tokens, out=str(tmp / "live"), **RECIPE), model=model)
    rows.append({"what": "train, live", "tokens_per_s": live["tokens_per_s"], "final_fvu": live["fvu"]})
    started = time.perf_counter()
    write_cache(model, iter(windows), tmp / "cache", tokens=args.tokens)
    rows.append({"what": "mlsae cache", "tokens_per_s": args.tokens / (time.perf_counter() - started)})
    cached = train(TrainConfig(cache=str(tmp / "cache"), tokens=args.tokens, out=str(tmp / "cached"),
                               **{k: v for k, v in RECIPE.items() if k != "ctx"}))
    rows.append({"what": "train --cache", "tokens_per_s": cached["tokens_per_s"], "final_fvu": cached["fvu"]})
    return rows


def memory(model, windows, sizes: list[int], tmp: Path) -> list[dict]:
    """Peak resident memory of `mlsae train --cache` (as a user launches it) on caches of ``sizes`` tokens."""
    out = []
    for n in sizes:
        folder = tmp / f"cache{n}"
        write_cache(model, iter(windows), folder, tokens=n)
        size_mb = sum(f.stat().st_size for f in folder.rglob("*")) / 2**20
        peak = peak_rss_mb([sys.executable, "-m", "mlsae.cli", "train", "--cache", str(folder), "--tokens", str(n),
                            "--out", str(tmp / f"m{n}"), "--no-verify-cache", *flags(RECIPE)])
        out.append({"cache_tokens": n, "cache_mb": size_mb, "peak_rss_mb": peak})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="builtin:pydocs")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--memory-tokens", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--memory-only", action="store_true", help="skip the speed rows (to measure another checkout's memory)")
    ap.add_argument("--json", default=str(RESULTS / "train.json"))
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        windows = list(pack_windows(iter_documents(args.data), model.tokenizer, RECIPE["ctx"]))
        if not args.memory_only:
            n_windows = -(-args.tokens // (RECIPE["ctx"] - 1))
            model.capture(windows[0][None, :32])  # warm up
            started = time.perf_counter()
            for i in range(0, n_windows, 8):
                model.capture(torch.stack(windows[i : min(i + 8, n_windows)]))
            capture = n_windows * (RECIPE["ctx"] - 1) / (time.perf_counter() - started)
            rows = [{"what": "capture alone (the floor)", "tokens_per_s": capture}, *speed(args, model, windows, tmp)]
            for r in rows:
                r["of_capture"] = r["tokens_per_s"] / capture
        peaks = memory(model, windows, args.memory_tokens, tmp)
    print(f"{'':<28} {'tokens/s':>9} {'x capture':>9}")
    for r in rows:
        print(f"{r['what']:<28} {r['tokens_per_s']:>9.0f} {r['of_capture']:>9.2f}")
    print(f"\n{'cache tokens':>12} {'cache MB':>9} {'peak RSS MB':>11}")
    for m in peaks:
        print(f"{m['cache_tokens']:>12} {m['cache_mb']:>9.0f} {m['peak_rss_mb']:>11.0f}")
    meta = {"cpus": os.cpu_count(), "model": args.model, "data": args.data, "tokens": args.tokens, "recipe": RECIPE,
            "threads": torch.get_num_threads()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "speed": rows, "memory": peaks}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
