"""Load test of the explorer (``mlsae serve``) on loopback: latency of the latent page and the prompt page.

Serves the given runs from this process, then sends a fixed number of requests from a few client
threads (it stops by itself) and prints p50/p95 per page; ``--screenshots DIR`` also saves each
page as headless Chromium draws it. Results go to ``results/serve.json``.

    python benchmarks/bench_serve.py RUN [RUN ...] [--requests 200] [--prompt-requests 20] [--screenshots DIR]

The latent page is its HTML and its API answer (the browser caches the scripts); the prompt page
its HTML and the prompt API on a text of ``--prompt-tokens`` tokens from the held-out corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def fetch(url: str) -> tuple[float, bytes]:
    """Seconds to read ``url`` whole, and what it read; an HTTP error raises."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
    return time.perf_counter() - started, body


def load(pages: list[list[str]], concurrency: int) -> list[tuple[float, bytes]]:
    """Load each page (its URLs one after another, as a browser would) from ``concurrency`` threads:
    for each page in the order given, the seconds it took and its last URL's answer (the data)."""
    def one(urls: list[str]) -> tuple[float, bytes]:
        answers = [fetch(u) for u in urls]
        return sum(s for s, _ in answers), answers[-1][1]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, pages))


def percentiles(answers: list[tuple[float, bytes]]) -> dict:
    ms = sorted(s * 1000 for s, _ in answers)
    return {"requests": len(ms), "p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], "max_ms": ms[-1]}


def latent_pages(base: str, run: str, n: int, seed: int = 0) -> list[list[str]]:
    info = json.load(urllib.request.urlopen(f"{base}/api/runs/{run}/latents?live_only=true&limit=1"))
    if not info["total"]:
        return []
    rng = random.Random(seed)
    pages = []
    for _ in range(n):
        offset = rng.randrange(max(info["total"], 1))
        row = json.load(urllib.request.urlopen(f"{base}/api/runs/{run}/latents?live_only=true&limit=1&offset={offset}"))["rows"][0]
        layer = "" if row["dictionary_layer"] is None else f"?layer={row['dictionary_layer']}"
        pages.append([f"{base}/runs/{run}/latents/{row['latent']}{layer}", f"{base}/api/runs/{run}/latents/{row['latent']}{layer}"])
    return pages


def prompt_text(tokenizer, tokens: int, corpus: Path | None) -> str:
    """About ``tokens`` tokens of held-out text (or of a fixed paragraph without a corpus)."""
    text = ""
    if corpus is not None and corpus.exists():
        for path in sorted(corpus.glob("*.jsonl")):
            for line in path.open():
                text += json.loads(line)["text"] + " "
                if len(tokenizer(text).input_ids) > tokens * 2:
                    break
            break
    text = text or "The quick brown fox jumps over the lazy dog. " * tokens
    lo, hi = 0, len(text)  # the longest prefix of at most ``tokens`` tokens (BOS included)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tokenizer(text[:mid]).input_ids) <= tokens else (lo, mid - 1)
    return text[:lo]


def screenshots(base: str, runs: list[dict], folder: Path, prompt: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        for run in runs:
            name = run["name"]
            top = json.load(urllib.request.urlopen(f"{base}/api/runs/{name}/latents?live_only=true&sort=n_tokens&descending=true&limit=1"))["rows"][0]
            layer = "" if top["dictionary_layer"] is None else f"?layer={top['dictionary_layer']}"
            shots = {
                "overview": (f"{base}/runs/{name}", "#latent-table tbody tr"),
                "latent": (f"{base}/runs/{name}/latents/{top['latent']}{layer}", "#examples .example"),
                "prompt": (f"{base}/runs/{name}/prompt?{urllib.parse.urlencode({'text': prompt})}", "#token-heatmap rect.cell"),
            }
            for kind, (url, ready) in shots.items():
                page.goto(url)
                page.wait_for_selector(ready, timeout=120_000)
                path = folder / f"{name}-{kind}.png"
                page.screenshot(path=str(path), full_page=True)
                saved.append(str(path))
        browser.close()
    return saved


def main() -> None:
    from mlsae.model import load_tokenizer
    from mlsae.runs import locate_run
    from mlsae.serve import in_background

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--requests", type=int, default=200, help="latent pages loaded per run")
    ap.add_argument("--prompt-requests", type=int, default=20, help="prompt pages loaded per run")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4, help="client threads loading latent pages")
    ap.add_argument("--prompt-concurrency", type=int, default=1,
                    help="client threads loading prompt pages (a run's model codes one prompt at a time: more only queue)")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "assets" / "corpus" / "test"))
    ap.add_argument("--screenshots", default=None)
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    _, meta, _ = locate_run(args.runs[0])
    tokenizer = load_tokenizer(meta["model"])
    ctx = min(locate_run(r)[1].get("train", {}).get("ctx") or args.prompt_tokens for r in args.runs)
    text = prompt_text(tokenizer, min(args.prompt_tokens, ctx), Path(args.corpus))
    rows = []
    with in_background(args.runs) as base:
        runs = json.load(urllib.request.urlopen(f"{base}/api/runs"))
        for run in runs:
            name = run["name"]
            started = time.perf_counter()
            fetch(f"{base}/api/runs/{name}/latents/0" + ("?layer=%d" % run["layers"][0] if run["latent_space"] == "per_layer" else ""))
            first_latent = time.perf_counter() - started
            started = time.perf_counter()
            fetch(f"{base}/api/runs/{name}/prompt?{urllib.parse.urlencode({'text': text})}")
            first_prompt = time.perf_counter() - started
            latent = percentiles(load(latent_pages(base, name, args.requests), args.concurrency))
            prompt_page = [f"{base}/runs/{name}/prompt?{urllib.parse.urlencode({'text': text})}",
                           f"{base}/api/runs/{name}/prompt?{urllib.parse.urlencode({'text': text})}"]
            prompt = percentiles(load([prompt_page] * args.prompt_requests, args.prompt_concurrency))
            rows.append({"run": name, "arch": run["arch"], "n_latents": run["n_latents"], "layers": len(run["layers"]),
                         "first_latent_s": first_latent, "first_prompt_s": first_prompt, "latent_page": latent,
                         "prompt_page": prompt, "prompt_tokens": len(tokenizer(text).input_ids)})
        shots = screenshots(base, runs, Path(args.screenshots), text) if args.screenshots else []
    print(f"{'run':<24} {'latents':>8} {'latent p50':>11} {'p95':>8} {'prompt p50':>11} {'p95':>8}  "
          f"(ms; latent pages from {args.concurrency} clients, prompts from {args.prompt_concurrency})")
    for r in rows:
        print(f"{r['run']:<24} {r['n_latents']:>8,} {r['latent_page']['p50_ms']:>11.1f} {r['latent_page']['p95_ms']:>8.1f} "
              f"{r['prompt_page']['p50_ms']:>11.1f} {r['prompt_page']['p95_ms']:>8.1f}")
    meta_out = {"concurrency": args.concurrency, "prompt_concurrency": args.prompt_concurrency, "requests": args.requests,
                "prompt_requests": args.prompt_requests, "threads": torch.get_num_threads(),
                "note": "loopback, server and clients in one process on the same cores; the first request of each kind (loading the "
                        "tokenizer, the coder, the model) is timed apart"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta_out, "rows": rows, "screenshots": [Path(p).name for p in shots]}, indent=1))
    print(f"written to {args.out}" + (f"; screenshots in {args.screenshots}" if shots else ""))


if __name__ == "__main__":
    main()
