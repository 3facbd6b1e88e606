"""Time one SAE forward+backward with the sparse and dense kernels (mlsae.kernels) on a realistic CPU shape.

    python benchmarks/bench_kernels.py [--N 4096 --d 576 --n-latents 2304 36864 --k 32 --reps 3]

The encoder matmul and TopK are shared by both impls; the difference is in the decoder and the backward.
Prints a table and writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mlsae.kernels import sparse_decode, topk_encode


def step(p: dict, k: int, impl: str) -> dict[str, float]:
    """One training-like step: encode, decode, FVU-style loss, backward. Returns seconds per phase."""
    for t in p.values():
        t.grad = None
    t0 = time.perf_counter()
    acts, idx, _ = topk_encode(p["x"] - p["b_pre"], p["W_enc"], p["b_enc"], k, impl=impl)
    t1 = time.perf_counter()
    x_hat = sparse_decode(acts, idx, p["W_dec"], impl=impl) + p["b_pre"]
    t2 = time.perf_counter()
    (x_hat - p["x"].detach()).pow(2).sum().backward()
    t3 = time.perf_counter()
    return {"encode": t1 - t0, "decode": t2 - t1, "backward": t3 - t2, "total": t3 - t0}


def largest_backward_alloc(p: dict, k: int, impl: str) -> int:
    """Largest single allocation (bytes) the backward makes, from the profiler."""
    for t in p.values():
        t.grad = None
    acts, idx, _ = topk_encode(p["x"] - p["b_pre"], p["W_enc"], p["b_enc"], k, impl=impl)
    loss = (sparse_decode(acts, idx, p["W_dec"], impl=impl) + p["b_pre"] - p["x"].detach()).pow(2).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    return max(e.cpu_memory_usage for e in prof.events())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n-latents", type=int, nargs="+", default=[2304, 36864])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = ap.parse_args()

    rows = []
    for n in args.n_latents:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, args.d, generator=g) / args.d**0.5
        p = {
            "x": torch.randn(args.N, args.d, generator=g),
            "W_enc": W.clone(), "W_dec": W.clone(), "b_enc": torch.zeros(n), "b_pre": torch.zeros(args.d),
        }
        p = {name: t.requires_grad_() for name, t in p.items()}
        grads, runs = {}, {"sparse": [], "dense": []}
        for rep in range(args.reps + 1):  # rep 0 warms up; impls alternate so both see the same machine state
            for impl in runs:
                r = step(p, args.k, impl)
                if rep:
                    runs[impl].append(r)
                grads[impl] = {name: t.grad.clone() for name, t in p.items()}
        for impl in runs:
            med = {phase: statistics.median(r[phase] for r in runs[impl]) * 1e3 for phase in runs[impl][0]}
            alloc = largest_backward_alloc(p, args.k, impl)
            rows.append(dict(N=args.N, d=args.d, n_latents=n, k=args.k, impl=impl,
                             **{f"{ph}_ms": round(v, 1) for ph, v in med.items()},
                             bwd_max_alloc_mb=round(alloc / 2**20, 1)))
        gs, gd = grads["sparse"], grads["dense"]  # sanity: both impls give the same gradients
        diff = max(((gs[m] - gd[m]).abs().max() / gd[m].abs().max()).item() for m in gs)
        rows[-1]["max_rel_grad_diff"] = rows[-2]["max_rel_grad_diff"] = float(f"{diff:.2e}")
        sp, de = rows[-2], rows[-1]
        sp["speedup_vs_dense"] = round(de["total_ms"] / sp["total_ms"], 2)

    cols = ["n_latents", "impl", "encode_ms", "decode_ms", "backward_ms", "total_ms", "bwd_max_alloc_mb"]
    print(f"N={args.N} d={args.d} k={args.k} reps={args.reps} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(" | ".join(f"{c:>12}" for c in cols + ["speedup"]))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>12}" for c in cols) + f" | {r.get('speedup_vs_dense', ''):>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                processor=platform.processor(), reps=args.reps, timing="median seconds*1e3 after one warm-up step")
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
