"""Input transforms: each against a plain formula, their composition, and their use by the coder."""

import numpy as np
import pytest
import torch

from mlsae.config import SAEConfig
from mlsae.errors import MlsaeError
from mlsae.sae import MultiLayerSAE, PerLayerSAEs, fvu_per_layer
from mlsae.transforms import LayerCentering, Pipeline, Standardize, build_transforms


def layered(n=64, layers=3, d=16, seed=0):
    """Vectors whose layers have different means and a massive, nearly constant dimension each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, d, generator=g)
    for l in range(layers):
        x[:, l, l] += 200.0 * (l + 1)  # a constant outlier dimension that differs between layers
        x[:, l] += torch.randn(d, generator=g) * 3  # and a per-layer mean
    return x


def test_standardize_forward_and_inverse():
    x = layered()
    y, state = Standardize()(x)
    np.testing.assert_allclose(y.mean(-1).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(-1, correction=0).numpy(), 1, atol=1e-3)
    torch.testing.assert_close(Standardize().inverse(y, state), x)
    torch.testing.assert_close(Standardize().inverse_delta(torch.ones_like(y), state), state[1].expand_as(y))


def test_layer_centering_subtracts_the_fitted_per_layer_mean():
    x = layered()
    c = LayerCentering(3, 16)
    with pytest.raises(MlsaeError, match="not fitted: call initialise"):
        c(x)
    c.fit(x)
    expected = x.numpy().astype(np.float64).mean(0)  # [layers, d]
    np.testing.assert_allclose(c.mean.numpy(), expected, rtol=1e-5, atol=1e-4)
    y, state = c(x)
    np.testing.assert_allclose(y.numpy(), x.numpy() - expected[None], atol=1e-3)
    np.testing.assert_allclose(y.double().mean(0).numpy(), 0, atol=1e-3)
    torch.testing.assert_close(c.inverse(y, state), x)
    # frozen: another batch is shifted by the SAME means, not re-centred
    x2 = layered(seed=1) + 5
    y2, _ = c(x2)
    torch.testing.assert_close(y2, x2 - c.mean)
    with pytest.raises(MlsaeError, match=r"expected \[tokens, 3, 16\]"):
        c.fit(torch.randn(4, 2, 16))


def test_pipeline_fits_each_step_on_what_it_receives_and_inverts_in_reverse():
    x = layered()
    p = build_transforms(True, True, 3, 16)
    assert p.describe() == ["standardize", "center_layers"]
    p.fit(x)
    xs, _ = Standardize()(x)
    torch.testing.assert_close(p.steps[1].mean, xs.double().mean(0).float())  # means of the STANDARDISED vectors
    y, state = p(x)
    torch.testing.assert_close(y, xs - xs.mean(0))
    torch.testing.assert_close(p.inverse(y, state), x, rtol=1e-5, atol=1e-3)
    assert build_transforms(False, False, 3, 16).describe() == []


def test_per_layer_fvu_is_unchanged_by_centring():
    x = layered()
    x_hat = x + torch.randn_like(x)
    c = LayerCentering(3, 16)
    c.fit(x)
    (y, _), (y_hat, _) = c(x), c(x_hat)
    torch.testing.assert_close(fvu_per_layer(y, y_hat), fvu_per_layer(x, x_hat))


@pytest.mark.parametrize("cls,arch", [(MultiLayerSAE, "mlsae"), (PerLayerSAEs, "per-layer")])
@pytest.mark.parametrize("loss_space", ["standardized", "raw"])
def test_a_perfect_coder_returns_the_input_exactly_through_the_transforms(cls, arch, loss_space, monkeypatch):
    x = layered()
    coder = cls(SAEConfig(arch=arch, expansion_factor=2, k=2, loss_space=loss_space), d_model=16, layers=[0, 1, 2])
    coder.initialise(x)
    seen = {}

    def perfect(x_in, dead):
        seen["x_in"] = x_in
        return x_in.clone(), torch.zeros(len(x_in), 3, 2), torch.zeros(len(x_in), 3, 2, dtype=torch.long), None, None

    monkeypatch.setattr(coder, "_code", perfect)
    out = coder(x)
    torch.testing.assert_close(out.x_hat, x, rtol=1e-5, atol=1e-3)
    assert out.fvu.abs().max() < 1e-6
    # the coder saw the centred, standardised vectors: each layer's mean is ~0 in its space
    assert seen["x_in"].double().mean(0).abs().max() < 1e-4


def test_centring_is_used_by_the_coder():
    """The same coder weights give different codes with and without the fitted means."""
    x = layered()
    on = MultiLayerSAE(SAEConfig(expansion_factor=2, k=2, b_pre_init="zero"), d_model=16, layers=[0, 1, 2], seed=0)
    off = MultiLayerSAE(SAEConfig(expansion_factor=2, k=2, b_pre_init="zero", center_layers=False), d_model=16, layers=[0, 1, 2], seed=0)
    on.initialise(x)
    off.initialise(x)
    assert on.transform.steps[1].mean.abs().sum() > 0
    assert not torch.equal(on(x).top_idx, off(x).top_idx)
    assert isinstance(on.transform, Pipeline) and len(off.transform.steps) == 1
