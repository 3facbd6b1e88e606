"""The coder's training step against a naive dense TopK SAE and sparsify's SparseCoder, with the
machine's matmul rate measured in the same run.

    python benchmarks/bench_step.py [--reps 3] [--shapes 576x4 576x16 576x64 512x64 4096x16] [--batch 4096]
    python benchmarks/bench_step.py --device cuda --bf16        # on a GPU: Triton kernels, bf16 autocast

One step = forward, backward, the decoder's parallel-gradient removal, Adam, decoder
renormalisation, on the same batch and shapes for every implementation (k 32, fp32 on CPU).
sparsify is optional (``pip install eai-sparsify``); without it its column reads "-". Vectors/s
is the batch over the median step time; the matmul fraction is the encoder's forward matmul
(2 N d n FLOP) over the step time, against the rate of that one matmul measured alone: the share
of the step that is the unavoidable work. Writes ``benchmarks/results/step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mlsae.sae import TopK
from mlsae.train import adam

RESULTS = Path(__file__).parent / "results"
K = 32
BF16 = False  # --bf16: the coders' forward passes under bf16 autocast (the weights stay fp32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, reps: int, device: torch.device = torch.device("cpu")) -> float:
    step()  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _autocast(device: torch.device):
    return torch.autocast(device.type, torch.bfloat16, enabled=BF16)


def ours(x: torch.Tensor, d: int, n: int):
    sae = TopK(d, n, K, torch.Generator().manual_seed(0)).to(x.device)
    opt = adam(sae.parameters(), 1e-4, 6.25e-10, x.device)  # the trainer's optimizer: Adam, fused

    def step():
        with _autocast(x.device):
            acts, idx, _ = sae.encode(x, "auto")  # sparse gathers on the CPU, the Triton kernels on a GPU
            loss = (sae.decode(acts, idx, "auto") - x).pow(2).sum() / x.var(0).sum()
        loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()

    return step


def naive(x: torch.Tensor, d: int, n: int):
    """The plain formula: dense pre-activations, TopK, a dense h, dense decoder, autograd."""
    g = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter(torch.empty(n, d).uniform_(-d**-0.5, d**-0.5, generator=g).to(x.device))
    W_dec = torch.nn.Parameter(W_enc.detach() / W_enc.detach().norm(dim=1, keepdim=True))
    b_pre = torch.nn.Parameter(torch.zeros(d, device=x.device))
    opt = torch.optim.Adam([W_enc, W_dec, b_pre], lr=1e-4)

    def step():
        with _autocast(x.device):
            pre = (x - b_pre) @ W_enc.T
            vals, idx = pre.topk(K, dim=1)
            h = torch.zeros_like(pre).scatter(1, idx, vals.relu())
            loss = (h @ W_dec + b_pre - x).pow(2).sum() / x.var(0).sum()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def sparsify(x: torch.Tensor, d: int, n: int):
    import os

    if x.device.type != "cuda":  # its Triton decoder runs on GPUs only: on the CPU, its own eager fallback
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=K), device=x.device)  # its own bf16 autocast on a GPU
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def matmul_rate(N: int, d: int, n: int, reps: int, device: torch.device) -> float:
    """FLOP/s of the encoder's matmul alone ([N, d] x [d, n], in bf16 with --bf16), the ceiling of a step."""
    dtype = torch.bfloat16 if BF16 else torch.float32
    a, b, c = (torch.randn(*s, device=device, dtype=dtype) for s in ((N, d), (n, d), (n,)))
    return 2 * N * d * n / timed(lambda: torch.addmm(c, a, b.T), reps, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["576x4", "576x16", "576x64", "512x64", "4096x16"],
                    help="d x expansion factor")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=["ours", "naive", "sparsify"], help="implementations to time")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (and the matmul rate in bf16)")
    ap.add_argument("--json", default=str(RESULTS / "step.json"))
    args = ap.parse_args()
    global BF16
    BF16 = args.bf16
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        d, R = map(int, shape.split("x"))
        n = d * R
        N = args.batch if d * n <= 512 * 32768 else max(256, args.batch // 4)  # Llama scale: a smaller batch fits
        x = torch.randn(N, d, generator=torch.Generator().manual_seed(1)).to(device)
        rate = matmul_rate(N, d, n, args.reps, device)
        row = {"d": d, "R": R, "n_latents": n, "batch": N, "k": K, "matmul_gflops": rate / 1e9}
        for name, make in (("ours", ours), ("naive", naive), ("sparsify", sparsify)):
            step = make(x, d, n) if name in args.impls else None
            if step is None:
                continue
            seconds = timed(step, args.reps, device)
            row[f"{name}_vectors_per_s"] = N / seconds
            row[f"{name}_matmul_fraction"] = 2 * N * d * n / seconds / rate
        for other in ("naive", "sparsify"):
            if f"{other}_vectors_per_s" in row:
                row[f"ours_vs_{other}"] = row["ours_vectors_per_s"] / row[f"{other}_vectors_per_s"]
        rows.append(row)
        print(f"d {d:5d} R {R:3d} batch {N:5d}: matmul {rate / 1e9:6.1f} GFLOP/s | ours {row['ours_vectors_per_s']:8.0f} vec/s "
              f"({100 * row['ours_matmul_fraction']:4.1f}% of matmul)"
              + (f" | x{row['ours_vs_naive']:.2f} naive" if "ours_vs_naive" in row else "")
              + (f" | x{row['ours_vs_sparsify']:.2f} sparsify ({100 * row['sparsify_matmul_fraction']:4.1f}%)"
                 if "ours_vs_sparsify" in row else " | sparsify not run"), flush=True)
    from mlsae.kernels import ROW_BLOCK

    meta = {"device": str(device), "bf16": BF16, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "encoder_row_block": ROW_BLOCK, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "reps": args.reps,
            "timing": "median seconds of a full training step after one warm-up step",
            "optimizers": "ours: Adam fused (as the trainer); naive and sparsify: torch's default Adam"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
