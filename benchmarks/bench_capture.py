"""Activation capture speed (all layers) and cache size per dtype, on the offline SmolLM2-135M.

    python benchmarks/bench_capture.py [--tokens 4096]

Prints a table and writes benchmarks/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mlsae.activations import write_cache
from mlsae.model import load_model
from mlsae.text import iter_documents, pack_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens timed per context length")
    parser.add_argument("--data", default="builtin:pydocs")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    model = load_model(args.model, device="cpu")
    rows = []
    for ctx, per_batch in ((256, 8), (2048, 1)):
        windows = list(pack_windows(iter_documents(args.data), model.tokenizer, ctx))[: max(1, args.tokens // ctx)]
        model.capture(windows[0][None, :64])  # warm up
        started = time.perf_counter()
        for i in range(0, len(windows), per_batch):
            model.capture(torch.stack(windows[i : i + per_batch]))
        seconds = time.perf_counter() - started
        n = len(windows) * ctx
        rows.append({"what": f"capture, ctx {ctx}, {model.n_layers} layers", "tokens": n, "seconds": seconds, "tokens_per_s": n / seconds})
    sizes = {}
    windows = list(pack_windows(iter_documents(args.data), model.tokenizer, 256))[:8]
    for dtype in ("float32", "float16", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            m = write_cache(model, iter(windows), Path(tmp) / "c", tokens=1000, dtype=dtype)
            total = sum(p.stat().st_size for p in (Path(tmp) / "c").iterdir())
            sizes[dtype] = {"mb_per_1k_tokens": total / 1e6 * 1000 / m["n_tokens"], "tokens": m["n_tokens"]}
    print(f"{'what':40} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['what']:40} {r['tokens']:>8} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.0f}")
    print(f"\n{'cache dtype':12} {'MB per 1k tokens':>17}")
    for dtype, s in sizes.items():
        print(f"{dtype:12} {s['mb_per_1k_tokens']:>17.2f}")
    out = Path(__file__).parent / "results" / "capture.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "capture": rows, "cache": sizes}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
