"""The concatenated SAE (arch concat) and its analyses: init scaling, post-activation bias,
block norms, a planted feature's trigger layer, information flow against finite differences,
and the command line end to end (train, eval --compare, analyze, report) with its bad input."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_model
from mlsae.analysis import FlowItem, block_norms, decoder_cosines, flow_items, information_flow, joint_latents, layers_holding
from mlsae.cli import main
from mlsae.config import SAEConfig
from mlsae.errors import MlsaeError
from mlsae.sae import ConcatSAE, MultiLayerSAE, PerLayerSAEs, load_coder, save_coder


def concat(n_layers=3, d=8, **kw):
    cfg = SAEConfig(**{"arch": "concat", "n_latents": 24, "k": 4, **kw})
    return ConcatSAE(cfg, d, list(range(n_layers)))


def total_variance(v):
    v = v.double().reshape(len(v), -1)
    return float((v - v.mean(0)).pow(2).sum().detach() / (len(v) - 1))


def test_concat_codes_one_row_per_token_and_reconstructs_every_layer():
    torch.manual_seed(0)
    coder = concat()
    x = torch.randn(50, 3, 8) * 4 + 1
    coder.initialise(x)
    out = coder(x)
    assert out.x_hat.shape == (50, 3, 8) and out.top_acts.shape == (50, 1, 4) and out.fvu.shape == (3,)
    acts, idx = coder.codes_at_layers(out.top_acts, out.top_idx)
    assert acts.shape == (50, 3, 4) and torch.equal(acts[:, 2], out.top_acts[:, 0]) and torch.equal(idx[:, 1], out.top_idx[:, 0])
    # activity by layer: the activation times the decoder block's share of the row's squared norm
    share = coder.decoder_blocks().detach().pow(2).sum(-1)
    share = share / share.sum(1, keepdim=True)
    activity = coder.activity_by_layer(out.top_acts, out.top_idx)
    t, j = 7, 2
    f = int(out.top_idx[t, 0, j])
    assert torch.allclose(activity[t, :, j], out.top_acts[t, 0, j] * share[f], rtol=1e-5)
    assert torch.allclose(activity.sum(1), out.top_acts[:, 0], rtol=1e-5)


def test_expansion_factor_counts_the_concatenated_input_and_n_latents_overrides_it():
    assert ConcatSAE(SAEConfig(arch="concat", expansion_factor=2, k=4), 8, [0, 1, 2]).n_latents == 2 * 8 * 3
    assert MultiLayerSAE(SAEConfig(expansion_factor=2, k=4), 8, [0, 1, 2]).n_latents == 2 * 8
    for cls in (MultiLayerSAE, PerLayerSAEs, ConcatSAE):
        assert cls(SAEConfig(arch=cls.arch, n_latents=40, k=4), 8, [0, 1, 2]).n_latents == 40
    with pytest.raises(MlsaeError, match="--k 8 is larger than --n-latents 5"):
        concat(n_latents=5, k=8)
    with pytest.raises(MlsaeError, match="only the concat arrangement scales its encoder"):
        MultiLayerSAE(SAEConfig(init_gain=0.5, k=4), 8, [0, 1])


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_init_scaling_gives_the_stated_reconstruction_variance(gain):
    torch.manual_seed(1)
    coder = concat(init_gain=gain, standardize=False, center_layers=False, b_pre_init="zero")
    x = torch.randn(400, 3, 8) * torch.tensor([1.0, 5.0, 20.0])[None, :, None]
    before = coder._reconstruct(x)
    info = coder.initialise(x)
    after = coder._reconstruct(x)
    assert total_variance(after) == pytest.approx(gain**2 * total_variance(x), rel=1e-4)
    assert info["encoder_scale"] == pytest.approx(gain * (total_variance(x) / total_variance(before)) ** 0.5, rel=1e-4)
    assert info["fvu_before_scaling"] != pytest.approx(info["fvu_after_scaling"])
    # encoder and decoder started tied, from unit Gaussian rows; only the encoder was scaled
    assert torch.allclose(coder.sae.W_enc / info["encoder_scale"], coder.sae.W_dec, atol=1e-6)


def test_post_activation_bias_is_used_and_round_trips(tmp_path):
    torch.manual_seed(2)
    coder = concat(post_bias=True)
    x = torch.randn(30, 3, 8)
    coder.initialise(x)
    with torch.no_grad():
        coder.sae.b_post.copy_(torch.rand(24) * 3 - 2.5)  # mostly negative: the ReLU after the bias acts
    out = coder(x)
    save_coder(coder, tmp_path / "run", "m", "fp")
    loaded, meta = load_coder(tmp_path / "run")
    assert meta["sae"]["post_bias"] is True
    assert torch.equal(loaded.sae.b_post, coder.sae.b_post)
    assert torch.equal(loaded(x).x_hat, out.x_hat)
    with torch.no_grad():
        loaded.sae.b_post.zero_()
    assert not torch.allclose(loaded(x).x_hat, out.x_hat)  # the bias is used
    active = out.top_acts > 0
    bias = coder.sae.b_post[out.top_idx]
    plain = concat(post_bias=False)
    plain.load_state_dict({k: v for k, v in coder.state_dict().items() if k != "sae.b_post"})
    raw = plain(x).top_acts
    assert torch.allclose(out.top_acts[active], torch.relu(raw + bias)[active])  # added to the active latents after TopK
    assert bool((out.top_acts == 0).any()) and bool((out.top_acts >= 0).all())


def test_block_norms_equal_explicit_slicing():
    torch.manual_seed(3)
    W = torch.randn(10, 4 * 6)
    norms = block_norms(W, 4)
    for f in range(10):
        for layer in range(4):
            assert norms[f, layer] == pytest.approx(float(W[f, layer * 6 : (layer + 1) * 6].norm()), rel=1e-6)
    assert layers_holding(torch.tensor([[0.7, 0.25, 0.05], [0.34, 0.33, 0.33], [1.0, 0.0, 0.0]])).tolist() == [2, 3, 1]
    with pytest.raises(MlsaeError, match="expected \\[latents, 5 x d\\]"):
        block_norms(W, 5)


def test_decoder_cosines_against_numpy():
    torch.manual_seed(4)
    dec = torch.randn(6, 3, 5)
    enc_norms = torch.rand(6, 3)
    latents = joint_latents(enc_norms, dec.norm(dim=-1), torch.tensor([5, 0, 9, 1, 7, 3]), 10, [2, 5, 8])
    assert latents.column("active").to_pylist() == [True, False, True, True, True, True]
    t = decoder_cosines(dec, latents, [2, 5, 8], top=3)  # the 3 most active: latents 2, 4, 0
    u = dec[[2, 4, 0]].numpy()
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    overall = t.filter(t.column("trigger_layer").is_null()).to_pylist()
    k1 = np.concatenate([(u[:, 0] * u[:, 1]).sum(-1), (u[:, 1] * u[:, 2]).sum(-1)])
    k2 = (u[:, 0] * u[:, 2]).sum(-1)
    assert overall[0]["k"] == 1 and overall[0]["mean_cosine"] == pytest.approx(k1.mean()) and overall[0]["std_cosine"] == pytest.approx(k1.std())
    assert overall[1]["k"] == 2 and overall[1]["mean_cosine"] == pytest.approx(k2.mean()) and overall[1]["n_pairs"] == 3


def planted_data(n=4096, seed=0):
    """5 layers, d 12: feature 0 writes to layers 2..4 only (norms 3, 1.5, 0.75); others live at one layer."""
    g = torch.Generator().manual_seed(seed)
    L, d, n_feat = 5, 12, 10
    dirs = torch.zeros(n_feat, L, d)
    planted = torch.randn(3, d, generator=g)
    dirs[0, 2:] = planted / planted.norm(dim=1, keepdim=True) * torch.tensor([3.0, 1.5, 0.75])[:, None]
    for i in range(1, n_feat):
        layer = (i - 1) % L
        v = torch.randn(d, generator=g)
        dirs[i, layer] = 2.5 * v / v.norm()
    fires = (torch.rand(n, n_feat, generator=g) < 0.15) * (1 + torch.rand(n, n_feat, generator=g))
    x = torch.einsum("nf,fld->nld", fires, dirs) + 0.05 * torch.randn(n, L, d, generator=g)
    return x, dirs[0]


@pytest.mark.parametrize("gain", [1.0, 0.1])
def test_a_planted_feature_writing_to_layers_2_to_4_is_recovered_with_trigger_layer_2(gain):
    """Recovered at either start; the trigger layer needs a small start (c = 0.1) on this data: at
    c = 1 the encoder starts 2.2x larger, and with no weight decay the parts of its rows that no
    gradient reaches keep their random start, as large as the learned ones (layer 3 wins)."""
    torch.manual_seed(5)
    x, planted = planted_data()
    cfg = SAEConfig(arch="concat", n_latents=24, k=4, standardize=False, center_layers=False, aux_coef=0, init_gain=gain)
    coder = ConcatSAE(cfg, 12, list(range(5)))
    coder.initialise(x[:512])
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    for step in range(400):
        batch = x[(step * 256) % 4096 :][:256]
        loss = coder(batch).loss
        loss.backward()
        coder.remove_parallel_grads()
        opt.step()
        opt.zero_grad()
        coder.normalize_decoder()
    assert float(coder(x).fvu.mean()) < 0.2
    target = (planted / planted.norm()).reshape(-1)
    cos = coder.sae.W_dec.detach() @ target
    f = int(cos.argmax())
    assert cos[f] > 0.9
    enc = block_norms(coder.sae.W_enc, 5)[f]
    dec = block_norms(coder.sae.W_dec, 5)[f]
    assert float(dec[:2].pow(2).sum()) < 0.02  # it writes nothing to layers 0 and 1
    assert int(dec.argmax()) == 2
    if gain < 1:
        assert int(enc.argmax()) == 2  # its trigger layer


def plain_std(v):
    """The per-vector standardisation's scale, by the plain formula: sqrt(mean((v - mean v)^2) + 1e-6)."""
    return float(((v - v.mean()) ** 2).mean().add(1e-6).sqrt())


def flow_of(model_map, coder, dec, layers, ids, resid, items, **kw):
    t = coder.transform
    return information_flow(model_map, t, t.inverse_delta, t.forward_delta, dec, layers, ids, resid, items, progress=False, **kw)


def test_information_flow_equals_finite_differences_of_the_models_map():
    model = tiny_model("llama", n_layers=4, seed=3)
    torch.manual_seed(6)
    layers = [0, 1, 3]
    ids = torch.randint(3, model.vocab_size, (2, 12))
    resid = model.capture(ids, layers).float()
    coder = ConcatSAE(SAEConfig(arch="concat", n_latents=16, k=3), model.d_model, layers)
    coder.initialise(resid.flatten(0, 1))
    out = coder(resid[:, 1:].flatten(0, 1))
    items = flow_items(out.top_acts, out.top_idx, torch.arange(2).repeat_interleave(11), torch.arange(1, 12).repeat(2), [0, 1, 2, 3, 4], 1)
    assert len(items) >= 3
    trigger = block_norms(coder.sae.W_enc, 3).argmax(1)
    dec = coder.decoder_blocks().detach()
    flow = flow_of(model.residuals_from, coder, dec, layers, ids, resid, items, trigger=trigger)
    assert flow.num_rows == len(items) * 3  # (0 -> 1), (0 -> 3), (1 -> 3)
    eps = 1e-2
    for row in flow.to_pylist():
        i, j = layers.index(row["layer_from"]), layers.index(row["layer_to"])
        w, t, f = row["window"], row["position"], row["latent"]
        v = dec[f, i] * plain_std(resid[w, t, i])  # the move along dec_{f,l}, in the model's units

        def at_target(e):
            r = resid[w : w + 1, : t + 1, i].clone()
            r[0, t] += e * v
            with torch.no_grad():
                return model.residuals_from(layers[i], r, ids[w : w + 1, : t + 1], [layers[j]])[0, t, 0]

        c = (at_target(eps) - at_target(-eps)) / (2 * eps) / plain_std(resid[w, t, j])  # in the coder's space
        target = dec[f, j]
        assert row["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(c, target, dim=0)), abs=2e-3)
        assert row["strength"] == pytest.approx(float((c * target).sum() / target.pow(2).sum()), abs=2e-3 * max(1, abs(row["strength"])))
        assert row["trigger_layer"] == layers[int(trigger[f])]
    with pytest.raises(MlsaeError, match="max_k 3: the run has 3 layers, so k can be 1 to 2"):
        flow_of(model.residuals_from, coder, dec, layers, ids, resid, items, max_k=3)


def test_a_pathway_that_copies_layer_l_forward_reads_cosine_1_and_strength_1():
    """A model map that carries layer l unchanged to every later layer, and a decoder that writes
    the same block at every layer: the decoder follows the pathway exactly, even where the
    block lies along the token's own vector (the transforms' state is held fixed both ways)."""
    torch.manual_seed(7)
    layers = [0, 1, 2]
    vec = torch.randn(2, 6, 1, 8) * 3 + 1
    resid = vec.expand(2, 6, 3, 8).clone()  # the same vector at every layer: the same scale
    ids = torch.zeros(2, 6, dtype=torch.long)
    coder = ConcatSAE(SAEConfig(arch="concat", n_latents=6, k=2), 8, layers)
    coder.initialise(resid.flatten(0, 1))
    with torch.no_grad():
        block = torch.randn(6, 8)
        block[0] = vec[0, 3, 0] - vec[0, 3, 0].mean()  # latent 0 writes along the token's own (centred) vector
        coder.sae.W_dec.copy_(block.repeat(1, 3) / block.repeat(1, 3).norm(dim=1, keepdim=True))

    def copy_forward(layer, residual, ids, later):
        return residual[:, :, None].expand(*residual.shape[:2], len(later), residual.shape[-1])

    items = [FlowItem(f, 0, 3, 1.0) for f in range(6)] + [FlowItem(2, 1, 5, 1.0)]
    flow = flow_of(copy_forward, coder, coder.decoder_blocks().detach(), layers, ids, resid, items)
    assert flow.num_rows == 7 * 3
    assert np.allclose(flow.column("cosine").to_numpy(), 1, atol=1e-5)
    assert np.allclose(flow.column("strength").to_numpy(), 1, atol=1e-5)


def test_bucket_means_count_each_latent_once():
    import pyarrow as pa

    from mlsae.analysis import flow_by_bucket

    rows = [dict(latent=1, trigger_layer=4, layer_from=4, layer_to=9, k=1, cosine=1.0, strength=2.0)] * 3
    rows += [dict(latent=2, trigger_layer=4, layer_from=4, layer_to=9, k=1, cosine=0.0, strength=0.0)]
    out = flow_by_bucket(pa.Table.from_pylist(rows)).to_pylist()
    assert out == [dict(trigger_layer=4, layer_from=4, layer_to=9, k=1, mean_cosine=0.5, mean_strength=1.0, n_rows=4, n_latents=2)]


def test_concat_from_the_command_line_with_compare_analyze_report_and_bad_input(tmp_path, capsys):
    model = tiny_model("llama", n_layers=4)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("a concatenated coder reads every layer at once, and writes to each. " * 80)
    common = ["--model", str(tmp_path / "m"), "--data", str(text), "--ctx", "32", "--tokens", "512", "--layers", "1", "2", "3",
              "--tokens-per-step", "64", "--micro-batch-tokens", "64", "--n-latents", "48", "-k", "4", "--lr", "0.003",
              "--device", "cpu"]
    for arch in ("concat", "mlsae", "per-layer"):
        assert main(["train", *common, "--arch", arch, "--out", str(tmp_path / arch)]) == 0
    saved = json.loads((tmp_path / "concat" / "config.json").read_text())
    assert saved["sae"]["arch"] == "concat" and saved["n_latents"] == 48 and saved["layers"] == [1, 2, 3]
    assert saved["init"]["encoder_scale"] > 0 and "fvu_before_scaling" in saved["init"]
    assert "encoder scaled by" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "concat"), "--compare", str(tmp_path / "mlsae"), str(tmp_path / "per-layer"),
                 "--data", str(text), "--tokens", "120", "--downstream-tokens", "40", "--no-ablations",
                 "--device", "cpu", "--out", str(tmp_path / "e")]) == 0
    table = pq.read_table(tmp_path / "e" / "compare.parquet")
    assert {"fvu[concat]", "fvu[mlsae]", "fvu[per-layer]", "l0[concat]", "delta_ce[concat]"} <= set(table.column_names)
    assert table.column("l0[concat]").to_pylist()[:3] == [4.0, 4.0, 4.0]  # one code per token, seen at every layer
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "concat"), "--data", str(text), "--tokens", "120", "--device", "cpu",
                 "--flow-latents-per-bucket", "2", "--flow-tokens", "2", "--flow-windows", "4",
                 "--flow-text", "every layer at once", "--flow-latent", "0", "1", "2", "3", "4", "5"]) == 0
    folder = tmp_path / "concat" / "analysis"
    for name in ("joint_latents", "block_norms", "decoder_cosines", "flow", "flow_buckets", "flow_text"):
        assert (folder / f"{name}.parquet").is_file(), name
    assert pq.read_table(folder / "block_norms.parquet").num_rows == 48 * 3
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["joint"]["n_active"] + summary["joint"]["never_active"] == 48
    assert main(["analyze", str(tmp_path / "mlsae"), "--data", str(text), "--tokens", "120", "--device", "cpu"]) == 0
    assert main(["report", str(tmp_path / "concat"), "--compare", str(tmp_path / "mlsae")]) == 0
    html = (tmp_path / "concat" / "report" / "index.html").read_text()
    for heading in ("Banding", "Decoder cosines", "Information flow", "How many layers"):
        assert heading in html, heading

    def refused(argv, message):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err

    refused(["train", *common, "--arch", "concat", "--n-latents", "3", "--out", str(tmp_path / "small")], "--k 4 is larger than --n-latents 3")
    assert not (tmp_path / "small").exists()
    refused(["eval", str(tmp_path / "concat"), "--data", str(text), "--layers", "0", "1", "--device", "cpu"], "layer 0 was not trained")
    before = sorted(p.name for p in folder.iterdir())
    refused(["analyze", str(tmp_path / "concat"), "--data", str(text), "--flow-max-k", "3", "--device", "cpu"],
            "--flow-max-k 3: ")
    refused(["analyze", str(tmp_path / "mlsae"), "--data", str(text), "--flow-text", "x", "--flow-latent", "1", "--device", "cpu"],
            "information flow needs a concat run")
    assert sorted(p.name for p in folder.iterdir()) == before
    # a cache of other layers than the run's: refused by name
    assert main(["cache", "--model", str(tmp_path / "m"), "--data", str(text), "--ctx", "32", "--tokens", "64",
                 "--layers", "0", "1", "--out", str(tmp_path / "c"), "--device", "cpu"]) == 0
    refused(["eval", str(tmp_path / "concat"), "--data", str(tmp_path / "c"), "--device", "cpu"], "not layer 2: capture the layers the run needs")
