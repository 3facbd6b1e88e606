"""The sparse coder against plain numpy formulas."""

import numpy as np
import pytest
import torch

from mlsae.config import SAEConfig
from mlsae.errors import MlsaeError
from mlsae.sae import (
    MultiLayerSAE,
    PerLayerSAEs,
    default_k_aux,
    geometric_median,
    fvu_per_layer,
    load_coder,
    save_coder,
)
from mlsae.transforms import standardize


def np_standardize(x):
    mean = x.mean(-1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    return (x - mean) / std, mean, std


def np_fvu(x, x_hat):  # x: [tokens, layers, d]
    out = []
    for l in range(x.shape[1]):
        xl, hl = x[:, l].astype(np.float64), x_hat[:, l].astype(np.float64)
        out.append(((xl - hl) ** 2).sum() / ((xl - xl.mean(0)) ** 2).sum())
    return np.array(out)


def np_encode_decode(sae, x):
    """eqs. 1-2 for one dictionary, row by row."""
    W_enc, W_dec, b_pre = (t.detach().double().numpy() for t in (sae.W_enc, sae.W_dec, sae.b_pre))
    out = np.zeros_like(x, dtype=np.float64)
    for i, row in enumerate(x.astype(np.float64)):
        pre = W_enc @ (row - b_pre)
        top = np.argsort(-pre, kind="stable")[: sae.k]
        h = np.zeros_like(pre)
        h[top] = np.maximum(pre[top], 0)
        out[i] = W_dec.T @ h + b_pre
    return out


def test_default_k_aux_is_power_of_two_nearest_half_d():
    assert [default_k_aux(d) for d in (576, 512, 100, 2048, 4)] == [256, 256, 64, 1024, 2]


def test_standardize_round_trip_and_moments():
    x = torch.randn(7, 3, 16) * 5 + 2
    xs, mean, std = standardize(x)
    exp, emean, estd = np_standardize(x.numpy().astype(np.float64))
    np.testing.assert_allclose(xs.numpy(), exp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xs.mean(-1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(xs.var(-1, correction=0).numpy(), 1, atol=1e-4)
    torch.testing.assert_close(xs * std + mean, x)


def test_fvu_per_layer_matches_numpy_and_hand_value():
    x = torch.randn(20, 4, 8)
    x_hat = x + 0.3 * torch.randn_like(x)
    np.testing.assert_allclose(fvu_per_layer(x, x_hat).numpy(), np_fvu(x.numpy(), x_hat.numpy()), rtol=1e-5)
    # by hand: two tokens, one layer, d=1: x = [1, 3], mean 2, var sum 2; x_hat = [1, 2] -> err 1 -> 0.5
    assert fvu_per_layer(torch.tensor([[[1.0]], [[3.0]]]), torch.tensor([[[1.0]], [[2.0]]])).item() == 0.5


@pytest.mark.parametrize("loss_space", ["standardized", "raw"])
def test_mlsae_forward_matches_equations(loss_space):
    cfg = SAEConfig(center_layers=False, arch="mlsae", expansion_factor=2, k=3, loss_space=loss_space, decoder_impl="dense")
    coder = MultiLayerSAE(cfg, d_model=8, layers=[0, 1, 2], seed=1)
    with torch.no_grad():
        coder.sae.b_pre.normal_()
    x = torch.randn(10, 3, 8) * 3 + 1
    out = coder(x)
    xs, mean, std = np_standardize(x.numpy().astype(np.float64))
    x_hat_std = np_encode_decode(coder.sae, xs.reshape(30, 8)).reshape(10, 3, 8)
    x_hat = x_hat_std * std + mean
    np.testing.assert_allclose(out.x_hat.detach().numpy(), x_hat, rtol=1e-4, atol=1e-4)
    expected_fvu = np_fvu(xs, x_hat_std) if loss_space == "standardized" else np_fvu(x.numpy(), x_hat)
    np.testing.assert_allclose(out.fvu.detach().numpy(), expected_fvu, rtol=1e-4)
    assert out.top_acts.shape == (10, 3, 3) and (out.top_acts >= 0).all()
    assert out.loss.item() == pytest.approx(expected_fvu.mean(), rel=1e-4)  # no dead latents: no AuxK


@pytest.mark.parametrize("auxk_norm", ["input", "error"])
@pytest.mark.parametrize("loss_space", ["standardized", "raw"])
def test_auxk_matches_hand_computation(auxk_norm, loss_space):
    d, n, k, k_aux = 4, 8, 2, 2
    cfg = SAEConfig(center_layers=False, arch="mlsae", expansion_factor=2, k=k, k_aux=k_aux, aux_coef=0.5,
                    decoder_impl="dense", auxk_norm=auxk_norm, loss_space=loss_space)
    coder = MultiLayerSAE(cfg, d_model=d, layers=[0, 1], seed=3)
    with torch.no_grad():
        coder.sae.b_pre.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
    x = torch.randn(6, 2, d) * 2 + 1
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    out = coder(x, dead)
    xs, _, std = np_standardize(x.numpy().astype(np.float64))
    flat = xs.reshape(12, d)
    x_hat = np_encode_decode(coder.sae, flat)
    W_enc, W_dec, b_pre = (t.detach().double().numpy() for t in (coder.sae.W_enc, coder.sae.W_dec, coder.sae.b_pre))
    e = flat - x_hat
    e_hat = np.zeros_like(e)
    for i, row in enumerate(flat):
        pre = W_enc @ (row - b_pre)
        dead_ids = np.array([1, 4, 6])
        top = dead_ids[np.argsort(-pre[dead_ids])[:k_aux]]
        e_hat[i] = W_dec[top].T @ np.maximum(pre[top], 0) + b_pre  # eq. 6
    e, e_hat = e.reshape(6, 2, d), e_hat.reshape(6, 2, d)
    target = xs
    if loss_space == "raw":  # errors in the model's units: the standardisation's scale undone
        e, e_hat, target = e * std, e_hat * std, x.numpy().astype(np.float64)
    err = ((e - e_hat) ** 2).sum(axis=(0, 2))
    norm_by = target if auxk_norm == "input" else e
    var = ((norm_by - norm_by.mean(0)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(out.auxk.detach().numpy(), err / var, rtol=1e-4)
    assert out.loss.item() == pytest.approx(out.fvu.mean().item() + 0.5 * (err / var).mean(), rel=1e-5)
    # the AuxK gradient reaches the dead latents' encoder rows, and only through the aux term
    out.loss.backward()
    assert coder.sae.W_enc.grad[[1, 4, 6]].abs().sum() > 0


def test_the_two_auxk_normalisations_differ_by_the_ratio_of_variances():
    x, dead = torch.randn(16, 2, 8), torch.ones(16, dtype=torch.bool)
    outs = {norm: MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=2, k=2, auxk_norm=norm), d_model=8,
                                layers=[0, 1], seed=0)(x, dead) for norm in ("input", "error")}
    # the same error over two denominators: their ratio is Var(e) / Var(x) per layer
    xs, mean, std = standardize(x)
    e = xs - (outs["input"].x_hat.detach() - mean) / std
    var = lambda v: (v - v.mean(0)).pow(2).sum((0, 2))  # noqa: E731
    torch.testing.assert_close(outs["input"].auxk / outs["error"].auxk, var(e) / var(xs), rtol=1e-4, atol=0)
    with pytest.raises(MlsaeError, match="auxk_norm 'both': expected one of input, error"):
        MultiLayerSAE(SAEConfig(auxk_norm="both"), d_model=8, layers=[0])


def test_decoder_normalisation_and_gradient_projection():
    coder = MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=2, k=2), d_model=6, layers=[0])
    W = coder.sae.W_dec
    g = torch.randn_like(W)
    W.grad = g.clone()
    coder.remove_parallel_grads()
    w = W.detach().numpy().astype(np.float64)
    expected = g.numpy() - (g.numpy() * w).sum(1, keepdims=True) * w
    np.testing.assert_allclose(W.grad.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((W.grad * W).sum(1).detach().numpy(), 0, atol=1e-6)
    with torch.no_grad():
        W.mul_(torch.rand(W.shape[0], 1) * 3 + 0.1)
    coder.normalize_decoder()
    np.testing.assert_allclose(W.norm(dim=1).detach().numpy(), 1, rtol=1e-6)


def test_per_layer_is_independent_single_layer_coders():
    cfg = SAEConfig(center_layers=False, arch="per-layer", expansion_factor=2, k=3, decoder_impl="dense")
    coder = PerLayerSAEs(cfg, d_model=8, layers=[0, 4], seed=0)
    x = torch.randn(12, 2, 8)
    out = coder(x)
    xs, mean, std = np_standardize(x.numpy().astype(np.float64))
    for i, sae in enumerate(coder.saes):
        np.testing.assert_allclose(out.x_hat[:, i].detach().numpy(), np_encode_decode(sae, xs[:, i]) * std[:, i] + mean[:, i], rtol=1e-4, atol=1e-4)
    assert not torch.equal(coder.saes[0].W_enc, coder.saes[1].W_enc)
    fired = coder.fired(out.top_acts, out.top_idx)
    assert fired.shape == (2, 16)
    for i in range(2):
        assert set(fired[i].nonzero().squeeze(1).tolist()) == set(out.top_idx[:, i][out.top_acts[:, i] > 0].tolist())


def test_per_layer_auxk_only_where_latents_are_dead():
    coder = PerLayerSAEs(SAEConfig(center_layers=False, arch="per-layer", expansion_factor=2, k=2), d_model=4, layers=[0, 1])
    dead = torch.zeros(2, 8, dtype=torch.bool)
    dead[1, 3] = True
    out = coder(torch.randn(5, 2, 4), dead)
    assert out.auxk[0].item() == 0 and out.auxk[1].item() > 0


def test_sparse_and_dense_paths_agree_with_gradients():
    x = torch.randn(16, 3, 8)
    outs = []
    for impl in ("sparse", "dense"):
        coder = MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=4, k=4, decoder_impl=impl), d_model=8, layers=[0, 1, 2], seed=0)
        dead = torch.zeros(32, dtype=torch.bool)
        dead[:10] = True
        out = coder(x, dead)
        out.loss.backward()
        outs.append((out.loss.detach(), [p.grad.clone() for p in coder.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_settings():
    with pytest.raises(MlsaeError, match="k 100 is larger than the number of latents"):
        MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=2, k=100), d_model=8, layers=[0])
    with pytest.raises(MlsaeError, match="expansion_factor 0: expected a positive integer"):
        MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=0), d_model=8, layers=[0])
    with pytest.raises(MlsaeError, match="k -1: expected a positive integer"):
        MultiLayerSAE(SAEConfig(center_layers=False, k=-1), d_model=8, layers=[0])
    coder = MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=2, k=2), d_model=8, layers=[0, 1])
    with pytest.raises(MlsaeError, match=r"expected \[tokens, 2, 8\]"):
        coder(torch.randn(3, 3, 8))


def test_save_load_round_trip_and_refusals(tmp_path):
    for cls, arch in ((MultiLayerSAE, "mlsae"), (PerLayerSAEs, "per-layer")):
        coder = cls(SAEConfig(center_layers=False, arch=arch, expansion_factor=2, k=2), d_model=8, layers=[1, 3], seed=7)
        save_coder(coder, tmp_path / arch, "tiny", "abc123")
        loaded, meta = load_coder(tmp_path / arch, model_fingerprint="abc123", arch=arch)
        assert type(loaded) is cls and meta["layers"] == [1, 3]
        for (n1, t1), (n2, t2) in zip(coder.state_dict().items(), loaded.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
        x = torch.randn(4, 2, 8)
        assert torch.equal(coder(x).x_hat, loaded(x).x_hat)
    with pytest.raises(MlsaeError, match="was trained on another model"):
        load_coder(tmp_path / "mlsae", model_fingerprint="other")
    with pytest.raises(MlsaeError, match="holds a mlsae coder, not per-layer"):
        load_coder(tmp_path / "mlsae", arch="per-layer")
    with pytest.raises(MlsaeError, match="holds no config.json"):
        load_coder(tmp_path / "nothing")


def np_weiszfeld(points, iters=2000):
    """The plain Weiszfeld iteration, in numpy, with a fixed number of steps."""
    y = points.mean(0)
    for _ in range(iters):
        dist = np.sqrt(((points - y) ** 2).sum(1))
        w = 1 / np.maximum(dist, 1e-12)
        y = (w[:, None] * points).sum(0) / w.sum()
    return y


def test_geometric_median_matches_weiszfeld_and_resists_outliers():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 5, generator=g, dtype=torch.float64)
    pts[:10] += 1000.0  # a few huge vectors drag the mean, not the median
    med = geometric_median(pts)
    np.testing.assert_allclose(med.numpy(), np_weiszfeld(pts.numpy()), atol=1e-5)
    total = lambda y: (pts - y).norm(dim=1).sum()  # noqa: E731
    assert total(med) < total(pts.mean(0))
    for _ in range(5):  # a local minimum of the sum of distances
        assert total(med) <= total(med + 1e-3 * torch.randn(5, generator=g, dtype=torch.float64))
    assert med.norm() < 5 < pts.mean(0).norm()


@pytest.mark.parametrize("how", ["geometric_median", "mean", "zero"])
def test_b_pre_starts_where_asked_in_the_coder_space(how):
    x = torch.randn(40, 2, 6) + torch.tensor([3.0, -2.0, 0, 0, 1, 0])
    for cls, arch in ((MultiLayerSAE, "mlsae"), (PerLayerSAEs, "per-layer")):
        coder = cls(SAEConfig(arch=arch, expansion_factor=2, k=2, b_pre_init=how, center_layers=False), d_model=6, layers=[0, 1])
        coder.initialise(x)
        xs, _, _ = standardize(x)
        groups = [xs.reshape(-1, 6)] if arch == "mlsae" else [xs[:, 0], xs[:, 1]]
        for sae, pts in zip(coder.dictionaries(), groups):
            expected = {"geometric_median": lambda: torch.from_numpy(np_weiszfeld(pts.double().numpy())).float(),
                        "mean": lambda: pts.mean(0), "zero": lambda: torch.zeros(6)}[how]()
            torch.testing.assert_close(sae.b_pre.detach(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(MlsaeError, match="b_pre_init 'median': expected one of geometric_median, mean, zero"):
        MultiLayerSAE(SAEConfig(b_pre_init="median"), d_model=6, layers=[0])


def test_old_runs_without_the_new_settings_load_as_they_were_trained(tmp_path):
    import json

    coder = MultiLayerSAE(SAEConfig(center_layers=False, expansion_factor=2, k=2), d_model=8, layers=[0, 1])
    save_coder(coder, tmp_path, "tiny", "abc")
    meta = json.loads((tmp_path / "config.json").read_text())
    for key in ("center_layers", "b_pre_init"):
        del meta["sae"][key]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded, _ = load_coder(tmp_path)
    assert loaded.cfg.center_layers is False and loaded.cfg.b_pre_init == "zero"
    x = torch.randn(3, 2, 8)
    assert torch.equal(loaded(x).x_hat, coder(x).x_hat)


def test_arrangements_declare_their_latent_space():
    from mlsae.sae import ARRANGEMENTS, LATENT_SPACES, latent_space_of, register

    assert {name: cls.latent_space for name, cls in ARRANGEMENTS.items()} == {"mlsae": "shared", "per-layer": "per_layer", "concat": "joint"}
    assert all(cls.latent_space in LATENT_SPACES for cls in ARRANGEMENTS.values())
    assert latent_space_of({"sae": {"arch": "per-layer"}}) == "per_layer"
    with pytest.raises(MlsaeError, match="arrangement 'nope' is unknown"):
        latent_space_of({"sae": {"arch": "nope"}})
    with pytest.raises(TypeError, match="latent_space must be one of"):
        register("undeclared")(type("Undeclared", (MultiLayerSAE,), {"latent_space": "sideways"}))
    assert "undeclared" not in ARRANGEMENTS
