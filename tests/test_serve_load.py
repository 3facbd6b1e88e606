"""A bounded load test of the explorer on loopback: a fixed number of latent and prompt pages
from four client threads; every one must answer (an HTTP error fails the test). Timing is the
benchmark's business (benchmarks/bench_serve.py); here the counts and the answers are checked."""

import json
import sys
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

from mlsae.serve import in_background

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_serve import latent_pages, load, percentiles  # noqa: E402


def test_forty_latent_pages_and_eight_prompts_from_four_clients_all_answer(explorer_runs):
    with in_background([explorer_runs["mlsae"], explorer_runs["per-layer"]]) as base:
        for run in ("mlsae", "per-layer"):
            pages = latent_pages(base, run, 40, seed=1)
            assert len(pages) == 40 and all(len(p) == 2 for p in pages)
            assert all(("?layer=" in p[1]) == (run == "per-layer") for p in pages)
            answers = load(pages, concurrency=4)
            stats = percentiles(answers)
            assert stats["requests"] == 40 and 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["max_ms"]
            # under load each answer is the one a lone request gets
            alone = load(pages, concurrency=1)
            assert [json.loads(b) for _, b in answers] == [json.loads(b) for _, b in alone]
            assert {json.loads(b)["latent"] for _, b in answers} == {int(p[1].split("/")[-1].split("?")[0]) for p in pages}
        text = urllib.parse.urlencode({"text": "the library reads files"})
        prompts = load([[f"{base}/api/runs/mlsae/prompt?{text}"]] * 8, concurrency=4)
        assert len({b for _, b in prompts}) == 1 and json.loads(prompts[0][1])["text"] == "the library reads files"
        with pytest.raises(urllib.error.HTTPError):  # a failing page fails the load test
            load([[f"{base}/api/runs/mlsae/latents/999"]], concurrency=1)
