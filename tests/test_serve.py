"""The explorer's API, every endpoint, checked against the run's own tables and a plain recomputation."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from conftest import EXPLORER_LAYERS as LAYERS
from mlsae.analysis.histogram import ActivationHistogram, bin_edges
from mlsae.model import load_model
from mlsae.serve import in_background
from mlsae.serve.app import create_app, run_names
from mlsae.serve.explorer import TokenText


@pytest.fixture(scope="module")
def client(explorer_runs):
    app = create_app([explorer_runs[n] for n in ("mlsae", "concat", "per-layer", "bare")])
    with TestClient(app) as c:
        yield c


def table(run, name):
    return pq.read_table(run / "analysis" / f"{name}.parquet")


def test_the_runs_are_listed_with_what_each_holds(client):
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert list(runs) == ["mlsae", "concat", "per-layer", "bare"]
    assert runs["concat"]["latent_space"] == "joint" and runs["per-layer"]["latent_space"] == "per_layer"
    assert [runs[n]["analysed"] for n in runs] == [True, True, True, False]
    assert [runs[n]["evaluated"] for n in runs] == [True, True, False, False]
    assert runs["mlsae"]["ctx"] == 24 and runs["mlsae"]["layers"] == LAYERS


def test_run_names_are_unique_and_url_safe(tmp_path):
    assert run_names([tmp_path / "a b", tmp_path / "x" / "a b", tmp_path / "c"]) == ["a-b", "a-b-2", "c"]


def test_the_overview_holds_the_eval_table_the_drift_and_the_layer_heatmap(client, explorer_runs):
    run = explorer_runs["mlsae"]
    data = client.get("/api/runs/mlsae/overview").json()
    assert data["eval"] == pq.read_table(run / "eval.parquet").to_pylist()
    assert data["drift"] == table(run, "drift").to_pylist()
    # the other served run with the same layers and an evaluation, side by side
    assert [c["run"] for c in data["compare"]] == ["concat"]
    assert data["not_compared"] == [{"run": "per-layer", "why": "it has no evaluation yet"}, {"run": "bare", "why": "it has no evaluation yet"}]
    assert data["compare"][0]["eval"] == pq.read_table(explorer_runs["concat"] / "eval.parquet").to_pylist()
    # the heatmap, recomputed: live latents by mean layer, each row p_i(l) / max_l p_i(l) (one latent per row here)
    lat = table(run, "latents").to_pandas()
    live = lat[~lat.dead].sort_values(["mean_layer", "latent"], kind="stable")
    dist = table(run, "layer_distribution").to_pandas()
    grid = np.zeros((64, len(LAYERS)))
    grid[dist.latent, [LAYERS.index(l) for l in dist.layer]] = dist.probability
    expected = grid[live.latent.to_numpy()]
    expected = expected / expected.max(1, keepdims=True)
    heat = data["heatmap"]
    assert heat["latents_per_row"] == 1 and heat["n_live"] == len(live)
    assert np.allclose(heat["rows"], expected, atol=1e-4)
    assert heat["mean_layer_lo"] == pytest.approx(live.mean_layer.tolist())


def test_the_latent_table_sorts_filters_and_pages_as_the_table_says(client, explorer_runs):
    lat = table(explorer_runs["mlsae"], "latents").to_pandas()
    seen = json.loads((explorer_runs["mlsae"] / "analysis" / "summary.json").read_text())["n_tokens"]
    pages = [client.get(f"/api/runs/mlsae/latents?sort=layer_variance&descending=true&limit=20&offset={o}").json() for o in (0, 20, 40, 60)]
    rows = [r for p in pages for r in p["rows"]]
    assert pages[0]["total"] == 64 and len(rows) == 64
    variances = [r["layer_variance"] for r in rows]
    live = [v for v in variances if v is not None]
    assert live == sorted(lat.aggregated_variance.dropna(), reverse=True) and variances[len(live):] == [None] * (64 - len(live))
    assert all(r["activation_rate"] == pytest.approx(lat.n_tokens[r["latent"]] / seen) for r in rows)
    lo, hi = float(lat.mean_layer.quantile(0.25)), float(lat.mean_layer.quantile(0.75))
    got = client.get(f"/api/runs/mlsae/latents?mean_layer_min={lo}&mean_layer_max={hi}&sort=mean_layer&limit=500").json()
    inside = lat[(lat.mean_layer >= lo) & (lat.mean_layer <= hi)]
    assert got["total"] == len(inside) > 0
    assert [r["latent"] for r in got["rows"]] == inside.sort_values(["mean_layer", "latent"]).latent.tolist()
    live_only = client.get("/api/runs/mlsae/latents?live_only=true&limit=500").json()
    assert live_only["total"] == int((~lat.dead).sum()) and not any(r["dead"] for r in live_only["rows"])


def test_a_concat_table_filters_by_trigger_layer_and_a_bank_by_dictionary(client, explorer_runs):
    joint = table(explorer_runs["concat"], "joint_latents").to_pandas()
    for layer in LAYERS:
        got = client.get(f"/api/runs/concat/latents?trigger_layer={layer}&limit=500").json()
        assert got["total"] == int((joint.trigger_layer == layer).sum())
        assert {r["latent"] for r in got["rows"]} == set(joint.latent[joint.trigger_layer == layer])
    bank = client.get("/api/runs/per-layer/latents?dictionary_layer=2&limit=500").json()
    assert bank["total"] == 64 and {r["dictionary_layer"] for r in bank["rows"]} == {2}
    default = client.get("/api/runs/per-layer/latents?limit=70").json()["rows"]  # listed dictionary by dictionary
    assert [(r["dictionary_layer"], r["latent"]) for r in default] == [(0, i) for i in range(64)] + [(2, i) for i in range(6)]
    assert client.get("/api/runs/mlsae/latents?trigger_layer=1").status_code == 422


def test_a_latent_page_holds_its_profile_examples_histogram_and_nearest_latents(client, explorer_runs):
    run = explorer_runs["mlsae"]
    lat = table(run, "latents").to_pandas()
    latent = int(lat[~lat.dead].sort_values("n_firings").latent.iloc[-1])
    d = client.get(f"/api/runs/mlsae/latents/{latent}").json()
    dist = table(run, "layer_distribution").to_pandas()
    mine = dist[dist.latent == latent].sort_values("layer")
    assert [p["probability"] for p in d["profile"]] == pytest.approx(mine.probability.tolist())
    # histogram: every firing (token, layer) of the latent counted once
    assert sum(b["count"] for b in d["histogram"]) == lat.n_firings[latent] > 0
    # examples: the table's rows for this latent (top 5 per layer), each context decoded token by token
    ex = table(run, "examples").to_pandas()
    ex = ex[(ex.latent == latent) & (ex["rank"] < 5)].sort_values(["layer", "rank"])
    assert [(e["layer"], e["rank"]) for e in d["examples"]] == list(zip(ex.layer, ex["rank"]))
    tokenizer = load_model(str(explorer_runs["model"]), device="cpu").tokenizer
    for e, (_, row) in zip(d["examples"], ex.iterrows()):
        assert e["activation"] == pytest.approx(row.activation)
        assert e["tokens"] == [tokenizer.decode([i]) for i in row.context_ids]
        assert e["tokens"][e["context_index"]] == tokenizer.decode([row.token_id])
    # nearest latents: the largest decoder cosines, recomputed from the saved weights
    W = torch.nn.functional.normalize(load_file(str(run / "sae.safetensors"))["sae.W_dec"], dim=1)
    cos = W @ W[latent]
    cos[latent] = -2
    top = torch.topk(cos, 10)
    assert [n["latent"] for n in d["nearest"]] == top.indices.tolist()
    assert [n["cosine"] for n in d["nearest"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_concat_latent_has_block_norms_and_its_examples_once_with_the_codes_activation(client, explorer_runs):
    run = explorer_runs["concat"]
    lat = table(run, "latents").to_pandas()
    latent = int(lat.sort_values("n_tokens").latent.iloc[-1])
    norms = table(run, "block_norms").to_pandas()
    d = client.get(f"/api/runs/concat/latents/{latent}").json()
    assert [b["layer"] for b in d["block_norms"]] == LAYERS
    assert [b["dec_norm"] for b in d["block_norms"]] == pytest.approx(norms[norms.latent == latent].sort_values("layer").dec_norm.tolist())
    assert sum(b["count"] for b in d["histogram"]) == lat.n_tokens[latent] > 0  # one joint code per token
    # the joint code's activation at a token is its activity summed over the layers it writes to
    ex = table(run, "examples").to_pandas()
    ex = ex[ex.latent == latent].groupby(["window", "position"]).activation.sum().sort_values(ascending=False)
    assert [e["layer"] for e in d["examples"]] == [None] * min(5, len(ex))
    assert [e["activation"] for e in d["examples"]] == pytest.approx(ex.iloc[:5].tolist(), rel=1e-5)
    top = max(e["activation"] for e in d["examples"])
    assert any(b["bin_lo"] <= top < b["bin_hi"] and b["count"] > 0 for b in d["histogram"])  # the histogram's largest code


def test_a_bank_latent_is_its_own_dictionarys(client, explorer_runs):
    run = explorer_runs["per-layer"]
    layer = 2  # the second dictionary: its number is not its position
    lat = table(run, "latents").to_pandas()
    mine = lat[lat.dictionary_layer == layer]
    latent = int(mine.sort_values("n_firings").latent.iloc[-1])
    d = client.get(f"/api/runs/per-layer/latents/{latent}?layer={layer}").json()
    row = mine[mine.latent == latent].iloc[0]
    assert d["dictionary_layer"] == layer and d["stats"]["n_firings"] == row.n_firings and d["stats"]["dictionary_layer"] == layer
    dist = table(run, "layer_distribution").to_pandas()
    own = dist[(dist.latent == latent) & (dist.dictionary_layer == layer)]
    assert [(p["layer"], p["n_firings"]) for p in d["profile"]] == list(zip(own.layer, own.n_firings)) == [(layer, row.n_firings)]
    assert sum(b["count"] for b in d["histogram"]) == row.n_firings
    ex = table(run, "examples").to_pandas()
    ex = ex[(ex.latent == latent) & (ex.layer == layer) & (ex["rank"] < 5)]
    assert [e["activation"] for e in d["examples"]] == pytest.approx(ex.activation.tolist()) and len(ex) > 0
    W = load_file(str(run / "sae.safetensors"))
    key = next(k for k in W if k.endswith("W_dec") and f".{LAYERS.index(layer)}." in k)
    Wn = torch.nn.functional.normalize(W[key], dim=1)
    cos = Wn @ Wn[latent]
    cos[latent] = -2
    assert [n["latent"] for n in d["nearest"]] == torch.topk(cos, 10).indices.tolist()
    assert {n["dictionary_layer"] for n in d["nearest"]} == {layer}


def test_tokens_read_as_they_do_inside_a_text():
    """A SentencePiece-style tokenizer decodes a word alone without its leading space: in context it has one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "▁a": 3, "a": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert tokenizer.decode([1]) == "the"  # alone: the space is gone
    assert TokenText(tokenizer)([1, 2]) == [" the", " cat"]


def expected_codes(explorer_runs, name, text):
    """The prompt recomputed: BOS and the text's tokens, the first position left out, the coder's
    per-layer profile of the rest; a latent keyed by (dictionary layer or None, index)."""
    from mlsae.runs import open_run

    model = load_model(str(explorer_runs["model"]), device="cpu")
    ids = torch.tensor([[1] + model.tokenizer("the library reads files", add_special_tokens=False).input_ids])
    coder = open_run(explorer_runs[name]).coder
    with torch.no_grad():
        o = coder(model.capture(ids, LAYERS)[0][1:])
        activity, latents = coder.layer_profile(o.top_acts, o.top_idx)
    bank = coder.latent_space == "per_layer"
    dense = {}  # (token, key) -> [activity per layer]
    for t in range(activity.shape[0]):
        for j in range(len(LAYERS)):
            for a, i in zip(activity[t, j].tolist(), latents[t, j].tolist()):
                if a > 0:
                    dense.setdefault((t, (LAYERS[j] if bank else None, i)), [0.0] * len(LAYERS))[j] += a
    return model, ids, activity, latents, dense


@pytest.mark.parametrize("name", ["mlsae", "concat", "per-layer"])
def test_a_prompt_is_coded_at_every_token_and_layer_as_the_coder_codes_it(client, explorer_runs, name):
    text = "the library reads files"
    d = client.get(f"/api/runs/{name}/prompt", params={"text": text}).json()
    model, ids, activity, latents, dense = expected_codes(explorer_runs, name, text)
    assert "".join(d["tokens"]) == model.tokenizer.decode(ids[0]) and d["counted"] == [False] + [True] * (ids.shape[1] - 1)
    assert len(d["cells"]) == activity.shape[0] == ids.shape[1] - 1
    for t, token_cells in enumerate(d["cells"]):
        for j, cell in enumerate(token_cells):
            order = torch.argsort(activity[t, j], descending=True)[:5]
            want = [(i, a) for i, a in zip(latents[t, j][order].tolist(), activity[t, j][order].tolist()) if a > 0]
            assert [c[0] for c in cell] == [i for i, _ in want]
            assert [c[1] for c in cell] == pytest.approx([a for _, a in want], abs=1e-3)
        heat = d["heat"][t]
        assert heat["latents"]
        for row, key in zip(heat["values"], heat["latents"]):
            assert row == pytest.approx(dense[(t, (key["layer"], key["latent"]))], abs=1e-3)
    # the whole text: each latent's largest activity at each layer over the tokens
    for row, key in zip(d["overall"]["values"], d["overall"]["latents"]):
        k = (key["layer"], key["latent"])
        assert row == pytest.approx(np.max([v for (t, kk), v in dense.items() if kk == k], axis=0).tolist(), abs=1e-3)


def test_bad_requests_get_one_clear_line_and_the_server_goes_on(client):
    cases = [
        ("/api/runs/mlsae/latents/64", 404, "latent 64 does not exist: run mlsae has 64 latents (0 to 63)"),
        ("/api/runs/mlsae/latents/-1", 404, "latent -1 does not exist"),
        ("/api/runs/per-layer/latents/3", 422, "name the latent's layer (?layer="),
        ("/api/runs/per-layer/latents/3?layer=1", 404, "layer 1: run per-layer has dictionaries at layers [0, 2, 3]"),
        ("/api/runs/mlsae/latents/3?layer=2", 422, "names a per-layer run's dictionary"),
        ("/api/runs/nope/overview", 404, "run 'nope' is not served here; served: mlsae, concat, per-layer, bare"),
        ("/api/runs/bare/latents", 404, "run bare has no analysis tables yet: run `mlsae analyze"),
        ("/api/runs/bare/latents/3", 404, "run bare has no analysis tables yet"),
        ("/api/runs/mlsae/latents?sort=nonsense", 422, "sort 'nonsense': expected one of latent, mean_layer"),
        ("/api/runs/mlsae/prompt?text=" + "x" * 40, 422, "text of 41 tokens is longer than the context (24): shorten it"),
        ("/api/runs/mlsae/prompt?text=%20%20", 422, "expected some text to code"),
        ("/runs/nope/latents/3", 404, "run 'nope' is not served here"),
    ]
    for url, status, message in cases:
        r = client.get(url)
        assert r.status_code == status and message in r.json()["detail"], (url, r.status_code, r.text)
    assert client.get("/api/runs/mlsae/latents?limit=501").status_code == 422
    assert client.get("/api/runs/mlsae/latents?offset=-1").status_code == 422
    assert client.get("/api/runs/mlsae/latents?offset=100000000000000000000").status_code == 422
    # a run without analysis still has its overview (with nothing to show but what it has)
    bare = client.get("/api/runs/bare/overview").json()
    assert bare["run"]["analysed"] is False and bare["heatmap"] is None and bare["eval"] is None
    assert client.get("/api/runs/mlsae/latents/3").status_code == 200


def test_a_model_that_cannot_be_loaded_is_a_503_for_prompts_and_the_rest_still_answers(explorer_runs, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(explorer_runs["mlsae"], run)
    meta = json.loads((run / "config.json").read_text())
    meta["model"] = str(tmp_path / "no-such-model")
    (run / "config.json").write_text(json.dumps(meta))
    with TestClient(create_app([run])) as c:
        r = c.get("/api/runs/moved/prompt", params={"text": "the library"})
        assert r.status_code == 503 and "the run's model cannot be loaded here" in r.json()["detail"]
        assert c.get("/api/runs/moved/latents?limit=3").status_code == 200
        page = c.get("/api/runs/moved/latents/3").json()  # the page without the tokenizer: token ids for its examples
        assert "the run's tokenizer cannot be loaded here" in page["examples_error"]
        assert page["profile"] and page["nearest"] and all(t.startswith("[") for e in page["examples"] for t in e["tokens"])


def test_every_page_has_an_address_and_static_assets_are_served(client):
    for url in ("/runs/mlsae", "/runs/mlsae/latents/3", "/runs/per-layer/latents/3?layer=2", "/runs/mlsae/prompt?text=abc", "/"):
        r = client.get(url)
        assert r.status_code == 200 and r.text.startswith("<!doctype html>"), url
    for asset in ("charts.js", "common.js", "overview.js", "latent.js", "prompt.js", "index.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/api/openapi.json").json()["info"]["title"] == "mlsae explorer"


def test_the_histogram_counts_firings_in_log_spaced_bins():
    torch.manual_seed(0)
    acts = torch.rand(50, 3, 4) * 20 * (torch.rand(50, 3, 4) > 0.3)
    acts[0, 0, 0] = 1e-6  # below the first edge: the first bin
    acts[0, 0, 1] = 1e6  # above the last: the last bin
    idx = torch.randint(0, 7, (50, 3, 4))
    edges = bin_edges()
    for per_layer in (False, True):
        h = ActivationHistogram(7, 3, per_layer=per_layer)
        h.update(acts, idx)
        got = h.result(LAYERS).to_pandas()
        for latent in range(7):
            for lpos in range(3) if per_layer else (None,):
                mask = (idx == latent) & (acts > 0)
                if lpos is not None:
                    mask[:, [l for l in range(3) if l != lpos]] = False
                values = np.clip(acts[mask].numpy(), edges[0], edges[-1] * 0.999)
                expected, _ = np.histogram(values, bins=edges)
                rows = got[(got.latent == latent) & ((got.dictionary_layer == LAYERS[lpos]) if per_layer else got.dictionary_layer.isna())]
                dense = np.zeros(len(edges) - 1, dtype=int)
                dense[np.searchsorted(edges, rows.bin_lo.to_numpy())] = rows["count"].to_numpy()
                assert (dense == expected).all(), (latent, lpos)


def test_in_background_serves_and_stops(explorer_runs):
    with in_background([explorer_runs["mlsae"]]) as url:
        assert json.load(urllib.request.urlopen(f"{url}/api/runs"))[0]["name"] == "mlsae"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/api/runs", timeout=2)


def test_mlsae_serve_starts_from_the_command_line_and_refuses_a_bad_run(explorer_runs, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "mlsae.cli", "serve", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith(f"run folder {tmp_path / 'missing'} does not exist")
    port = subprocess.run([sys.executable, "-m", "mlsae.cli", "serve", str(explorer_runs["mlsae"]), "--port", "70000"],
                          capture_output=True, text=True)
    assert port.returncode == 2 and "--port 70000: expected a port number from 1 to 65535" in port.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "mlsae.cli", "serve", str(explorer_runs["mlsae"]), "--port", str(taken)],
                              capture_output=True, text=True)
        assert busy.returncode == 2 and f"--port {taken}: cannot listen there" in busy.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlsae.cli", "serve", str(explorer_runs["mlsae"]), str(explorer_runs["concat"]),
                               "--port", str(free)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = server.stdout.readline()
        assert first.startswith("opening ")  # it says what it does from its first second
        for _ in range(300):
            try:
                runs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{free}/api/runs", timeout=2))
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("mlsae serve did not answer")
        assert [r["name"] for r in runs] == ["mlsae", "concat"]
        said = [server.stdout.readline() for _ in range(4)]  # the rest of "opening", "serving", then the warm-up
        assert any(line.startswith("serving 2 run(s) at http://127.0.0.1:") for line in said)
        assert "ready: the latent pages of mlsae\n" in said
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_bank_heatmap_puts_each_latent_at_its_own_layer(client, explorer_runs):
    heat = client.get("/api/runs/per-layer/overview").json()["heatmap"]
    lat = table(explorer_runs["per-layer"], "latents").to_pandas()
    assert heat["n_live"] == int((~lat.dead).sum()) and heat["latents_per_row"] == 1
    rows = np.array(heat["rows"])
    assert (np.sort(rows, axis=1)[:, :-1] == 0).all() and np.allclose(rows.max(1), 1)  # one layer each, its peak
    assert (np.diff(rows.argmax(1)) >= 0).all()  # sorted by mean layer = dictionary layer


def test_the_table_pages_through_a_hundred_and_twenty_thousand_latents(explorer_runs, tmp_path):
    """A run whose analysis tables list 120k latents (written here, not trained): the pages are
    disjoint, cover the table in the order asked, and the heatmap bins every live latent."""
    import shutil

    import pyarrow as pa

    run = tmp_path / "wide"
    shutil.copytree(explorer_runs["mlsae"], run)
    n = 120_000
    rng = np.random.default_rng(0)
    mean_layer = rng.uniform(0, 2, n)
    dead = rng.random(n) < 0.1
    lat = pa.table({"latent": np.arange(n), "dictionary_layer": pa.nulls(n, pa.int64()), "dead": dead,
                    "n_tokens": rng.integers(1, 300, n), "n_firings": rng.integers(1, 900, n), "activation_sum": rng.random(n),
                    "mean_layer": pa.array(mean_layer, mask=dead), "aggregated_variance": rng.random(n), "per_token_variance": rng.random(n),
                    "variance_ratio": rng.random(n) + 1, "n_layers_active": rng.integers(1, 4, n)})
    pq.write_table(lat, run / "analysis" / "latents.parquet")
    dist = pa.table({"latent": np.repeat(np.arange(n), 3), "dictionary_layer": pa.nulls(3 * n, pa.int64()),
                     "layer": np.tile(LAYERS, n), "probability": rng.random(3 * n)})
    pq.write_table(dist, run / "analysis" / "layer_distribution.parquet")
    meta = json.loads((run / "config.json").read_text())
    meta["n_latents"] = n
    (run / "config.json").write_text(json.dumps(meta))
    with TestClient(create_app([run])) as c:
        seen = []
        for offset in range(0, n, 500):
            page = c.get(f"/api/runs/wide/latents?sort=mean_layer&live_only=true&limit=500&offset={offset}").json()
            seen += [r["latent"] for r in page["rows"]]
        assert page["total"] == int((~dead).sum()) == len(seen) == len(set(seen))
        assert seen == np.arange(n)[~dead][np.argsort(mean_layer[~dead], kind="stable")].tolist()
        heat = c.get("/api/runs/wide/overview").json()["heatmap"]
        live = np.arange(n)[~dead][np.argsort(mean_layer[~dead], kind="stable")]
        per = heat["latents_per_row"]
        assert heat["n_live"] == len(live) and len(heat["rows"]) == -(-len(live) // per) <= 240 < -(-len(live) // (per - 1))
        p = dist.column("probability").to_numpy().reshape(n, 3)[live]
        p = p / p.max(1, keepdims=True)
        for r in (0, 7, len(heat["rows"]) - 1):  # a row: the mean of its latents' rows, each relative to its peak layer
            assert heat["rows"][r] == pytest.approx(p[r * per : (r + 1) * per].mean(0).tolist(), abs=1e-4)
            assert heat["mean_layer_lo"][r] == pytest.approx(mean_layer[live[r * per]])
            assert heat["mean_layer_hi"][r] == pytest.approx(mean_layer[live[min((r + 1) * per, len(live)) - 1]])


@pytest.mark.parametrize("statistics", [True, False])
def test_a_latents_examples_are_read_from_the_row_groups_holding_it(explorer_runs, tmp_path, statistics):
    """Row groups of 7 rows: most latents span two or more; without statistics every group is read."""
    from mlsae.serve.explorer import ExampleFile

    source = table(explorer_runs["mlsae"], "examples")
    pq.write_table(source, tmp_path / "e.parquet", row_group_size=7, write_statistics=statistics)
    f = ExampleFile(tmp_path / "e.parquet")
    assert f.file.metadata.num_row_groups > 100
    frame = source.to_pandas()
    for latent in (0, 3, 17, 63, 64):
        want = frame[frame.latent == latent].sort_values(["layer", "rank"])
        got = f.of(latent)
        assert [(r["layer"], r["rank"], r["window"], r["position"]) for r in got] == list(zip(want.layer, want["rank"], want.window, want.position))
        assert [r["context_ids"] for r in got] == [list(c) for c in want.context_ids]
