"""The paper's analyses on synthetic activations whose answers are known by construction or
computed with plain numpy / Python loops."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from mlsae.analysis import (
    Drift,
    LayerDistribution,
    LayerMeans,
    TopExamples,
    attach_context,
    decoder_geometry,
    prompt_heatmap,
    query_examples,
)
from mlsae.errors import MlsaeError


def codes(entries: dict[tuple[int, int], list[tuple[int, float]]], T: int, L: int, k: int):
    """Dense ``top_acts, top_idx: [T, L, k]`` from {(token, layer position): [(latent, act)]};
    empty slots get activation 0 and index 0 (inactive)."""
    acts = torch.zeros(T, L, k)
    idx = torch.zeros(T, L, k, dtype=torch.int64)
    for (t, l), pairs in entries.items():
        for j, (i, a) in enumerate(pairs):
            idx[t, l, j], acts[t, l, j] = i, a
    return acts, idx


def random_codes(T: int, L: int, k: int, n: int, seed: int, p_inactive: float = 0.3):
    """Random codes with distinct latents per (token, layer), some slots inactive."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T * L)]).view(T, L, k)
    acts = torch.rand(T, L, k, generator=g) * 5
    acts[torch.rand(T, L, k, generator=g) < p_inactive] = 0
    return acts, idx


# ---------------------------------------------------------------- layer distribution


def constructed():
    """Latents with known answers over 8 tokens, layers 0..5 (k = 4 slots):
    0: only at layer 3 (varying strength)      -> mean 3, aggregated var 0, per-token var 0
    1: layer 1 on even tokens, 5 on odd, equal -> mean 3, aggregated var 4, per-token var 0
    2: layers 2 and 4 on every token, equal    -> mean 3, aggregated var 1, per-token var 1
    3: never fires                             -> dead, nulls
    4: layers {0, 2} on even tokens, {3, 5} on odd, equal -> mean 2.5, agg var 3.25, per-token var 1
    """
    T, L = 8, 6
    e: dict = defaultdict(list)
    for t in range(T):
        e[(t, 3)].append((0, 1.0 + t))
        e[(t, 1 if t % 2 == 0 else 5)].append((1, 2.0))
        e[(t, 2)].append((2, 0.5 + t))
        e[(t, 4)].append((2, 0.5 + t))
        for l in ((0, 2) if t % 2 == 0 else (3, 5)):
            e[(t, l)].append((4, 1.5))
    return codes(e, T, L, 4), list(range(L))


def test_layer_distribution_known_answers():
    (acts, idx), layers = constructed()
    ld = LayerDistribution(5, layers)
    ld.update(acts, idx)
    lat = ld.result()["latents"].to_pylist()
    expect = {  # latent: (mean, aggregated var, per-token var, ratio, layers active aggregated)
        0: (3.0, 0.0, 0.0, None, 1),
        1: (3.0, 4.0, 0.0, None, 2),
        2: (3.0, 1.0, 1.0, 1.0, 2),
        4: (2.5, 3.25, 1.0, 3.25, 4),
    }
    for i, (mean, agg, pt, ratio, n_agg) in expect.items():
        row = lat[i]
        assert row["latent"] == i and row["dead"] is False and row["n_tokens"] == 8
        assert row["mean_layer"] == pytest.approx(mean, abs=1e-12)
        assert row["aggregated_variance"] == pytest.approx(agg, abs=1e-12)
        assert row["per_token_variance"] == pytest.approx(pt, abs=1e-12)
        assert row["variance_ratio"] == (None if ratio is None else pytest.approx(ratio))
        assert row["n_layers_active"] == n_agg
    assert lat[0]["per_token_variance"] == 0.0 and lat[1]["per_token_variance"] == 0.0  # exact
    assert lat[0]["mean_layers_per_token"] == 1 and lat[2]["mean_layers_per_token"] == 2
    assert lat[1]["multi_layer_token_fraction"] == 0 and lat[4]["multi_layer_token_fraction"] == 1
    dead = lat[3]
    assert dead["dead"] is True and dead["n_tokens"] == 0 and dead["n_layers_active"] == 0
    for col in ("mean_layer", "aggregated_variance", "per_token_variance", "variance_ratio",
                "mean_layers_per_token", "multi_layer_token_fraction"):
        assert dead[col] is None
    # p_i(l) of latent 1: half at layer 1, half at layer 5; latent 0 at layer 3 with all its mass
    dist = {(r["latent"], r["layer"]): r for r in ld.result()["layer_distribution"].to_pylist()}
    assert dist[(1, 1)]["probability"] == pytest.approx(0.5) and dist[(1, 5)]["n_firings"] == 4
    assert dist[(0, 3)]["probability"] == 1.0 and dist[(0, 3)]["activation_sum"] == sum(1.0 + t for t in range(8))
    assert not any(key[0] == 3 for key in dist)

    s = ld.summary()
    assert (s["n_live"], s["n_dead"], s["dead_fraction"]) == (4, 1, 0.2)
    agg, pt = (0 + 4 + 1 + 3.25) / 4, (0 + 0 + 1 + 1) / 4
    assert s["variance_ratio"] == pytest.approx(agg / pt)
    assert s["median_variance_ratio"] == pytest.approx((1 + 3.25) / 2)
    assert s["multi_layer_fraction_aggregated"] == 0.75  # latents 1, 2, 4 of the 4 live
    # per token: latents 0, 1, 2, 4 active; 2 and 4 at two layers -> 1/2 on every token
    assert s["multi_layer_fraction_per_token"] == 0.5 and s["multi_layer_fraction_pooled"] == 0.5
    hist = ld.result()["n_layers"].to_pylist()
    assert [r["per_token_count"] for r in hist] == [16, 16, 0, 0, 0, 0]
    assert [r["aggregated_count"] for r in hist] == [1, 2, 0, 1, 0, 0]
    for table in ld.result().values():  # no NaN anywhere
        for col in table.columns:
            if pa.types.is_floating(col.type):
                assert not pc.any(pc.is_nan(col)).as_py()  # nulls, which to_numpy shows as NaN, are fine


def np_paper_variances(acts, idx, n_latents, layers):
    """The paper definition (Lawson et al.'s code), straight from its formula with dense arrays."""
    T, L, k = acts.shape
    a = np.zeros((T, n_latents, L))
    for t in range(T):
        for li in range(L):
            for j in range(k):
                if acts[t, li, j] > 0:
                    a[t, idx[t, li, j], li] += float(acts[t, li, j])
    total = a.sum(2, keepdims=True)
    q = np.divide(a, total, out=np.zeros_like(a), where=total > 0)  # [T, n, L]; all 0 where inactive
    lv = np.asarray(layers, dtype=np.float64)
    var = lambda w: (w * lv**2).sum(-1) - (w * lv).sum(-1) ** 2  # noqa: E731
    agg = var(q.mean(0)).mean()  # Q_i = mean over ALL tokens (sums to the firing rate), then over latents
    per_token = var(q).mean()  # over ALL (token, latent) pairs, inactive ones counting 0
    return agg, per_token, agg / per_token


def test_paper_variance_ratio_matches_its_formula_streamed():
    for (acts, idx), layers, n in ((constructed()[0], list(range(6)), 5), (random_codes(40, 5, 3, 12, seed=4), [2, 3, 5, 8, 9], 12)):
        ld = LayerDistribution(n, layers)
        for sl in (slice(0, 3), slice(3, None)):  # streamed in two batches
            ld.update(acts[sl], idx[sl])
        s = ld.summary()
        agg, pt, ratio = np_paper_variances(acts.numpy(), idx.numpy(), n, layers)
        assert s["mean_aggregated_variance_paper"] == pytest.approx(agg, rel=1e-9)
        assert s["mean_per_token_variance_paper"] == pytest.approx(pt, rel=1e-9)
        assert s["variance_ratio_paper"] == pytest.approx(ratio, rel=1e-9)


def test_paper_variance_ratio_differs_from_ours_by_a_known_factor():
    """One latent over 4 tokens, layers 0 and 1: token 0 at both (equal), token 1 at layer 1
    only (per-token variance exactly 0), tokens 2-3 silent (firing rate 1/2).
    Ours: p = (1/3, 2/3), aggregated var 2/9; per-token (0.25 + 0) / 2 tokens where it fires.
    Paper: Q = (0.5, 1.5) / 4, V = 0.375 - 0.375^2; per token (0.25 + 0) / 4 pairs."""
    acts, idx = codes({(0, 0): [(0, 1.0)], (0, 1): [(0, 1.0)], (1, 1): [(0, 1.0)]}, 4, 2, 1)
    ld = LayerDistribution(1, [0, 1])
    ld.update(acts, idx)
    s = ld.summary()
    ours, paper = (2 / 9) / 0.125, (0.375 - 0.375**2) / 0.0625
    assert s["variance_ratio"] == pytest.approx(ours) and s["variance_ratio_paper"] == pytest.approx(paper)
    assert s["variance_ratio_paper"] / s["variance_ratio"] == pytest.approx(2.109375)


def test_layer_distribution_uses_actual_layer_numbers():
    acts, idx = codes({(0, 0): [(0, 1.0)], (0, 1): [(0, 1.0)]}, 1, 2, 1)
    ld = LayerDistribution(1, [10, 20])
    ld.update(acts, idx)
    row = ld.result()["latents"].to_pylist()[0]
    assert row["mean_layer"] == 15 and row["per_token_variance"] == 25 and row["aggregated_variance"] == 25
    assert ld.mean_layer().tolist() == [15.0]


def reference_layers(acts, idx, n, layers):
    """Plain-loop layer statistics: {latent: (mean, agg var, per-token var, n tokens)}."""
    acts, idx = acts.double().numpy(), idx.numpy()
    T, L, k = acts.shape
    total = np.zeros((n, L))
    per_token = defaultdict(lambda: defaultdict(float))  # (t, i) -> {layer: act}
    for t in range(T):
        for l in range(L):
            for j in range(k):
                if acts[t, l, j] > 0:
                    total[idx[t, l, j], l] += acts[t, l, j]
                    per_token[(t, idx[t, l, j])][layers[l]] += acts[t, l, j]
    var_sum, count = np.zeros(n), np.zeros(n)
    for (t, i), by_layer in per_token.items():
        ls, w = np.array(list(by_layer)), np.array(list(by_layer.values()))
        p = w / w.sum()
        m = (p * ls).sum()
        var_sum[i] += (p * (ls - m) ** 2).sum()
        count[i] += 1
    out = {}
    for i in range(n):
        if count[i]:
            p = total[i] / total[i].sum()
            m = (p * np.array(layers)).sum()
            out[i] = (m, (p * (np.array(layers) - m) ** 2).sum(), var_sum[i] / count[i], int(count[i]))
    return out


def test_layer_distribution_matches_loops_and_streams():
    acts, idx = random_codes(T=40, L=5, k=6, n=25, seed=1)
    layers = [0, 2, 3, 7, 9]
    ref = reference_layers(acts, idx, 25, layers)
    whole, parts = LayerDistribution(25, layers), LayerDistribution(25, layers)
    whole.update(acts, idx)
    parts.update(acts[:13], idx[:13])
    parts.update(acts[13:], idx[13:])
    for ld in (whole, parts):
        rows = ld.result()["latents"].to_pylist()
        assert {r["latent"] for r in rows if not r["dead"]} == set(ref)
        for i, (m, agg, pt, cnt) in ref.items():
            r = rows[i]
            assert r["n_tokens"] == cnt
            assert r["mean_layer"] == pytest.approx(m, rel=1e-9)
            assert r["aggregated_variance"] == pytest.approx(agg, rel=1e-9)
            assert r["per_token_variance"] == pytest.approx(pt, rel=1e-9, abs=1e-12)


def test_layer_distribution_per_layer_dictionaries():
    # per-layer bank: latent 0 of layer 0's dictionary and latent 0 of layer 1's are different latents
    acts, idx = codes({(0, 0): [(0, 1.0)], (0, 1): [(0, 3.0)]}, 1, 2, 1)
    ld = LayerDistribution(2, [4, 5], shared_dictionary=False)
    ld.update(acts, idx)
    rows = ld.result()["latents"].to_pylist()
    assert [(r["dictionary_layer"], r["latent"], r["dead"]) for r in rows] == [(4, 0, False), (4, 1, True), (5, 0, False), (5, 1, True)]
    assert rows[0]["mean_layer"] == 4 and rows[2]["mean_layer"] == 5 and rows[2]["per_token_variance"] == 0
    shared = LayerDistribution(2, [4, 5])
    shared.update(acts, idx)
    assert shared.result()["latents"].to_pylist()[0]["per_token_variance"] == pytest.approx(0.1875)  # p = 1/4, 3/4


def test_never_firing_gives_nulls_not_nan():
    ld = LayerDistribution(3, [0, 1])
    ld.update(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2, dtype=torch.int64))
    s = ld.summary()
    assert s["n_dead"] == 3 and s["variance_ratio"] is None and s["median_variance_ratio"] is None
    assert s["multi_layer_fraction_per_token"] is None
    table = ld.result()["latents"]
    assert table.column("mean_layer").null_count == 3 and table.column("variance_ratio").null_count == 3
    assert ld.result()["n_layers"].column("per_token_fraction").null_count == 2


# ---------------------------------------------------------------- drift


def test_drift_known_cosines_and_percentiles():
    g = torch.Generator().manual_seed(0)
    T, d = 3000, 16
    x0 = torch.randn(T, d, generator=g)
    rot = torch.stack([-x0[:, 1::2], x0[:, ::2]], -1).reshape(T, d)  # orthogonal to x0 at every token
    x3 = torch.randn(T, d, generator=g) + 0.5 * rot
    x = torch.stack([x0, x0, rot, x3], 1)  # [T, 4, d]
    layers = [0, 1, 2, 5]
    drift = Drift(layers, n_bins=20_000)
    drift.update(x[:1000])
    drift.update(x[1000:])
    rows = drift.result().to_pylist()
    assert [(r["layer"], r["next_layer"], r["centred"]) for r in rows] == [(0, 1, False), (1, 2, False), (2, 5, False)]
    assert rows[0]["mean"] == pytest.approx(1.0, abs=1e-6) and rows[0]["std"] < 1e-3
    assert rows[1]["mean"] == pytest.approx(0.0, abs=1e-6) and abs(rows[1]["p50"]) < 1e-3
    a, b = rot.double().numpy(), x3.double().numpy()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert rows[2]["mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert rows[2]["std"] == pytest.approx(cos.std(), abs=1e-5)
    for q in (10, 50, 90):
        assert rows[2][f"p{q}"] == pytest.approx(np.percentile(cos, q), abs=2e-3)
    assert drift.summary()["mean_cosine"] == pytest.approx((1 + 0 + cos.mean()) / 3, abs=1e-6)
    assert drift.summary()["mean_cosine_centred"] is None


def test_drift_mean_centred_matches_numpy():
    g = torch.Generator().manual_seed(1)
    T, d = 500, 8
    x = torch.randn(T, 3, d, generator=g) + torch.tensor([5.0, -3.0, 2.0])[None, :, None]
    means = LayerMeans([0, 1, 2], d)
    means.update(x[:200])
    means.update(x[200:])
    mu = means.result()
    assert torch.allclose(mu, x.double().mean(0), atol=1e-10)
    drift = Drift([0, 1, 2], layer_means=mu)
    drift.update(x)
    centred = [r for r in drift.result().to_pylist() if r["centred"]]
    xc = (x.double() - x.double().mean(0)).numpy()
    for j, r in enumerate(centred):
        a, b = xc[:, j], xc[:, j + 1]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert r["mean"] == pytest.approx(cos.mean(), abs=1e-5) and r["n_tokens"] == T
        assert r["p50"] == pytest.approx(np.median(cos), abs=5e-3)
    raw = [r for r in drift.result().to_pylist() if not r["centred"]]
    assert raw[0]["mean"] < -0.5 and abs(centred[0]["mean"]) < 0.2  # offsets +5 and -3 dominate raw cosines


# ---------------------------------------------------------------- examples


def brute_top(acts, idx, token_ids, window, position, layers, n):
    """{(latent, layer): [(act, window, position, token)] best first}, plain sort, first seen wins ties."""
    rows = defaultdict(list)
    T, L, k = acts.shape
    seen = 0
    for t in range(T):
        for l in range(L):
            for j in range(k):
                if acts[t, l, j] > 0:
                    rows[(int(idx[t, l, j]), layers[l])].append(
                        (float(acts[t, l, j]), seen, int(window[t]), int(position[t]), int(token_ids[t])))
                    seen += 1
    return {key: [(a, w, p, tok) for a, _, w, p, tok in sorted(v, key=lambda r: (-r[0], r[1]))[:n]] for key, v in rows.items()}


def test_top_examples_match_brute_force_over_batches():
    T, L, k, n_latents, n = 120, 3, 4, 10, 5
    acts, idx = random_codes(T, L, k, n_latents, seed=2)
    for t in (5, 50):  # an exact tie across batches: the example seen first ranks first
        hit = (idx[t, 0] == 7).nonzero()
        j = int(hit[0, 0]) if len(hit) else 0
        idx[t, 0, j], acts[t, 0, j] = 7, 9.0
    token_ids = torch.randint(0, 100, (T,), generator=torch.Generator().manual_seed(3))
    window, position = torch.arange(T) // 10, torch.arange(T) % 10
    layers = [1, 4, 6]
    top = TopExamples(n_latents, layers, n=n)
    for s in range(0, T, 25):
        sl = slice(s, s + 25)
        top.update(acts[sl], idx[sl], token_ids[sl], window[sl], position[sl])
    table = top.result()
    assert table.column_names == ["latent", "layer", "rank", "activation", "window", "position", "token_id"]
    got = defaultdict(list)
    for r in table.to_pylist():
        assert r["rank"] == len(got[(r["latent"], r["layer"])])
        got[(r["latent"], r["layer"])].append((r["activation"], r["window"], r["position"], r["token_id"]))
    ref = brute_top(acts, idx, token_ids, window, position, layers, n)
    assert set(got) == set(ref)
    for key in ref:
        assert [(pytest.approx(a), w, p, t) for a, w, p, t in ref[key]] == got[key]
    assert got[(7, 1)][0][1:3] == (0, 5)  # the tie at 9.0: token 5 (window 0) before token 50


def test_top_examples_per_latent():
    acts, idx = random_codes(30, 4, 3, 6, seed=4)
    ids = torch.arange(30)
    top = TopExamples(6, [0, 1, 2, 3], n=3, per_layer=False)
    top.update(acts, idx, ids, ids, ids)
    for r in top.result().to_pylist():
        t, l = r["window"], r["layer"]
        assert r["activation"] == pytest.approx(float(acts[t, l][idx[t, l] == r["latent"]].max()))
    best = {i: float(acts[idx == i].max()) for i in range(6) if (acts[idx == i] > 0).any()}
    assert {r["latent"]: r["activation"] for r in top.result().to_pylist() if r["rank"] == 0} == pytest.approx(best)


def test_context_and_duckdb_query(tmp_path):
    windows = torch.arange(40).view(4, 10) + 100  # token id = 100 + 10 * window + position
    acts, idx = codes({(0, 0): [(2, 1.0)], (1, 0): [(2, 3.0)], (2, 1): [(2, 2.0), (0, 5.0)]}, 3, 2, 2)
    window, position = torch.tensor([0, 2, 3]), torch.tensor([0, 5, 9])
    token_ids = windows[window, position]
    top = TopExamples(3, [0, 1], n=2)
    top.update(acts, idx, token_ids, window, position)
    table = attach_context(top.result(), windows, decode=lambda ids: " ".join(map(str, ids)), before=2, after=1)
    rows = {(r["latent"], r["layer"], r["rank"]): r for r in table.to_pylist()}
    r = rows[(2, 0, 0)]  # window 2, position 5
    assert r["context_ids"] == [123, 124, 125, 126] and r["context_index"] == 2
    assert (r["text_before"], r["token_text"], r["text_after"]) == ("123 124", "125", "126")
    assert rows[(2, 0, 1)]["context_ids"] == [100, 101] and rows[(2, 0, 1)]["context_index"] == 0
    assert rows[(0, 1, 0)]["context_ids"] == [137, 138, 139]
    path = tmp_path / "examples.parquet"
    pq.write_table(table, path)
    got = query_examples(path, 2)
    assert [(g["layer"], g["rank"], g["activation"]) for g in got] == [(0, 0, 3.0), (0, 1, 1.0), (1, 0, 2.0)]
    assert [g["token_id"] for g in query_examples(path, 2, layer=1)] == [139]
    assert query_examples(path, 1) == []
    with pytest.raises(MlsaeError, match="windows"):
        attach_context(top.result(), windows[:, :5])
    with pytest.raises(MlsaeError, match="token_id"):
        attach_context(top.result(), windows + 1)
    with pytest.raises(MlsaeError, match="parquet_path"):
        query_examples(tmp_path / "missing.parquet", 0)


def test_prompt_heatmap_against_loops():
    acts, idx = random_codes(7, 3, 4, 12, seed=5)
    heat_max = prompt_heatmap(acts, idx, 12, n_top=5)
    heat_sum = prompt_heatmap(acts, idx, 12, latents=[3, 0], reduce="sum")
    dense_max, dense_sum = np.zeros((12, 3)), np.zeros((12, 3))
    for t in range(7):
        for l in range(3):
            for j in range(4):
                i, a = int(idx[t, l, j]), float(acts[t, l, j])
                if a > 0:
                    dense_max[i, l] = max(dense_max[i, l], a)
                    dense_sum[i, l] += a
    expect = [int(i) for i in np.argsort(-dense_sum.sum(1), kind="stable")[:5]]
    assert heat_max.latents == expect
    assert np.allclose(heat_max.values.numpy(), dense_max[expect])
    assert heat_sum.latents == [3, 0] and np.allclose(heat_sum.values.numpy(), dense_sum[[3, 0]])
    silent = prompt_heatmap(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1, dtype=torch.int64), 4)
    assert silent.latents == [] and tuple(silent.values.shape) == (0, 3)


# ---------------------------------------------------------------- decoder geometry


def brute_geometry(W, mean_layer, bin_width):
    live = [i for i, m in enumerate(mean_layer) if m is not None]
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    bins = defaultdict(list)
    for x in range(len(live)):
        for y in range(x + 1, len(live)):
            i, j = live[x], live[y]
            bins[math.floor(abs(mean_layer[i] - mean_layer[j]) / bin_width)].append(float(Wn[i] @ Wn[j]))
    return bins


def test_decoder_geometry_all_pairs_against_loops():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(30, 8, generator=g)
    mean_layer = [float(v) for v in torch.rand(30, generator=g) * 6]
    mean_layer[4] = mean_layer[17] = None  # dead latents are left out
    geo = decoder_geometry(W, mean_layer, n_pairs=10_000, bin_width=0.5)
    ref = brute_geometry(W.double().numpy(), mean_layer, 0.5)
    assert geo.summary["exhaustive"] and geo.summary["n_pairs"] == 28 * 27 // 2 == geo.sample.num_rows
    rows = geo.bins.to_pylist()
    assert [r["bin"] for r in rows] == sorted(ref)
    for r in rows:
        c = np.array(ref[r["bin"]])
        assert r["n_pairs"] == len(c) and r["dlayer_lo"] == r["bin"] * 0.5
        assert r["mean_cosine"] == pytest.approx(c.mean(), abs=1e-6)
        assert r["mean_abs_cosine"] == pytest.approx(np.abs(c).mean(), abs=1e-6)
        assert r["std_cosine"] == pytest.approx(c.std(), abs=1e-5)
    assert not {4, 17} & set(geo.sample.column("latent_a").to_pylist() + geo.sample.column("latent_b").to_pylist())
    # the same answer from a tensor with NaN for dead latents
    as_tensor = torch.tensor([float("nan") if m is None else m for m in mean_layer])
    assert decoder_geometry(W, as_tensor, n_pairs=10_000, bin_width=0.5).bins.equals(geo.bins)


def test_decoder_geometry_sampled_pairs():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(100, 6, generator=g)
    mean_layer = torch.rand(100, generator=g) * 10
    geo = decoder_geometry(W, mean_layer, n_pairs=2000, seed=3, max_sample=500)
    assert not geo.summary["exhaustive"] and geo.summary["n_pairs"] == 2000
    assert sum(geo.bins.column("n_pairs").to_pylist()) == 2000 and geo.sample.num_rows == 500
    Wn = (W / W.norm(dim=1, keepdim=True)).double().numpy()
    for r in geo.sample.to_pylist():
        a, b = r["latent_a"], r["latent_b"]
        assert a != b and r["cosine"] == pytest.approx(float(Wn[a] @ Wn[b]), abs=1e-6)
        assert r["dlayer"] == pytest.approx(abs(float(mean_layer[a] - mean_layer[b])))
    assert decoder_geometry(W, mean_layer, n_pairs=2000, seed=3, max_sample=500).bins.equals(geo.bins)
    assert not decoder_geometry(W, mean_layer, n_pairs=2000, seed=4, max_sample=500).bins.equals(geo.bins)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error():
    acts, idx = random_codes(4, 2, 3, 5, seed=8)
    ld = LayerDistribution(5, [0, 1])
    cases = [
        (lambda: ld.update(acts, idx[:, :, :2]), "top_idx: expected the shape"),
        (lambda: ld.update(acts[:0], idx[:0]), "empty batch"),
        (lambda: ld.update(acts[:, :1], idx[:, :1]), "expected 2 layers"),
        (lambda: ld.update(-acts, idx), ">= 0"),
        (lambda: ld.update(acts * float("nan"), idx), "NaN"),
        (lambda: ld.update(acts, idx + 5), r"\[0, 5\)"),
        (lambda: ld.update(acts, idx.float()), "integer"),
        (lambda: LayerDistribution(0, [0, 1]), "n_latents"),
        (lambda: LayerDistribution(5, [3, 1]), "increasing"),
        (lambda: Drift([0]), "at least 2"),
        (lambda: Drift([0, 1]).update(torch.randn(3, 3, 4)), "expected 2 layers"),
        (lambda: Drift([0, 1]).update(torch.randn(0, 2, 4)), "empty batch"),
        (lambda: Drift([0, 1], layer_means=torch.zeros(3, 4)), "layer_means"),
        (lambda: Drift([0, 1], layer_means=torch.zeros(2, 4)).update(torch.randn(3, 2, 5)), "d = 4"),
        (lambda: Drift([0, 1]).result(), "no batches"),
        (lambda: LayerMeans([0, 1], 4).result(), "no batches"),
        (lambda: TopExamples(5, [0, 1]).update(acts, idx, torch.arange(4), torch.arange(3), torch.arange(4)), "window: expected 4 rows"),
        (lambda: prompt_heatmap(acts, idx, 5, reduce="mean"), "reduce"),
        (lambda: prompt_heatmap(acts, idx, 5, latents=[9]), "latents"),
        (lambda: decoder_geometry(torch.randn(4, 3), [1.0, None, None, None]), "at least 2 live"),
        (lambda: decoder_geometry(torch.randn(4, 3), [1.0, 2.0]), "one value per latent"),
        (lambda: decoder_geometry(torch.randn(4), [1.0] * 4), "W_dec"),
    ]
    for call, message in cases:
        with pytest.raises(MlsaeError, match=message):
            call()
