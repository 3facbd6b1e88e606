"""Export to and import from sparsify and SAELens: the real libraries, on CPU, reconstruct the
same activations as our coders (the hub code is in test_hub.py)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.config import TrainConfig
from mlsae.errors import MlsaeError
from mlsae.interop import export_run, import_bank, layer_saes
from mlsae.runs import open_run
from mlsae.sae import ARRANGEMENTS, load_coder
from mlsae.text import pack_windows
from mlsae.train import train
from mlsae.transforms import LensTransform

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU; these tests run on the CPU
sparsify = pytest.importorskip("sparsify", reason="the interop tests load exports with the real sparsify (scripts/setup.sh installs it)")
sae_lens = pytest.importorskip("sae_lens", reason="the interop tests load exports with the real SAELens (scripts/setup.sh installs it)")

TEXT = [f"Note {i}: an exported coder reconstructs as {i * 7 % 13} layers of it did here." for i in range(200)]
SETTINGS = dict(expansion_factor=2, k=4, tokens=384, tokens_per_step=64, micro_batch_tokens=64, init_tokens=128, lr=3e-3,
                dead_tokens=150, shuffle_buffer_mb=1, device="cpu")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3, seed=3)


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop") / "c"
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), folder, tokens=700, shard_tokens=400)
    return folder


@pytest.fixture(scope="module")
def acts(cache):
    from mlsae.activations import ActivationCache

    return next(ActivationCache(cache).batches(200, shuffle=False)).acts  # [200, 3, 32], the model's units


def trained(tmp_path, cache, arch, **kw):
    out = tmp_path / arch
    train(TrainConfig(cache=str(cache), arch=arch, out=str(out), standardize=False, **{**SETTINGS, **kw}))
    return out


@pytest.mark.parametrize("arch", ["mlsae", "per-layer"])
def test_an_export_reconstructs_in_sparsify_and_saelens_as_the_run_does(tmp_path, cache, acts, arch):
    """Our coder (with its per-layer centring folded into b_dec) loaded by each library: the same
    reconstruction of the same activations, layer by layer."""
    from sae_lens import SAE
    from sparsify import SparseCoder

    run = trained(tmp_path, cache, arch)
    coder = open_run(run).coder
    with torch.no_grad():
        ours = coder(acts).x_hat
    assert "center_layers" in coder.transform.describe()
    export_run(run, "sparsify", tmp_path / "sp")
    export_run(run, "saelens", tmp_path / "sl")
    banks = SparseCoder.load_many(str(tmp_path / "sp"), local=True)
    assert sorted(banks) == ["layers.0", "layers.1", "layers.2"]
    for i, layer in enumerate(coder.layers):
        sp = banks[f"layers.{layer}"]
        with torch.no_grad():
            enc = sp.encode(acts[:, i])
            theirs = sp.decode(enc.top_acts, enc.top_indices)
        assert torch.allclose(theirs, ours[:, i], atol=1e-4, rtol=1e-4), (layer, (theirs - ours[:, i]).abs().max())
        sl = SAE.load_from_disk(str(tmp_path / "sl" / f"blocks.{layer}.hook_resid_post"))
        assert sl.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        with torch.no_grad():
            theirs = sl.decode(sl.encode(acts[:, i]))
        assert torch.allclose(theirs, ours[:, i], atol=1e-4, rtol=1e-4), (layer, (theirs - ours[:, i]).abs().max())


def test_a_tuned_lens_folds_into_the_exported_weights(acts):
    """x_in = A_l x + t_l (lens, then centring) folded into W_enc, W_dec and b_dec: the plain
    per-layer SAE reconstructs as the coder with its transforms does."""
    from mlsae.config import SAEConfig

    torch.manual_seed(0)
    coder = ARRANGEMENTS["per-layer"](SAEConfig(arch="per-layer", expansion_factor=2, k=4, standardize=False, lens="x"), 32, [0, 1, 2])
    coder.transform.steps[0] = LensTransform(0.1 * torch.randn(3, 32, 32), torch.randn(3, 32), [0, 1, 2])
    coder.initialise(acts)
    for d in coder.dictionaries():
        d.b_enc.normal_()
    with torch.no_grad():
        ours = coder(acts).x_hat
    for i, sae in enumerate(layer_saes(coder)):
        assert torch.allclose(sae.reconstruct(acts[:, i]), ours[:, i], atol=1e-4), i


@pytest.mark.parametrize("kw, message", [
    ({"arch": "concat", "expansion_factor": 1}, "ONE code per token spanning all 3 layers; sparsify holds one SAE per layer"),
    ({"arch": "mlsae", "standardize": True}, "standardises each vector by its own mean and standard deviation"),
])
def test_what_a_format_cannot_hold_is_refused_naming_what_would_be_lost(tmp_path, cache, kw, message):
    arch = kw.pop("arch")
    out = tmp_path / arch
    train(TrainConfig(cache=str(cache), arch=arch, out=str(out), **{**SETTINGS, **kw}))
    done = subprocess.run([sys.executable, "-m", "mlsae.cli", "export", str(out), "--format", "sparsify", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x").exists()


def test_an_export_folder_in_use_needs_overwrite(tmp_path, cache):
    run = trained(tmp_path, cache, "mlsae")
    export_run(run, "sparsify", tmp_path / "sp")
    with pytest.raises(MlsaeError, match="already exists and is not empty; pass --overwrite"):
        export_run(run, "saelens", tmp_path / "sp")
    export_run(run, "saelens", tmp_path / "sp", overwrite=True)
    assert (tmp_path / "sp" / "blocks.0.hook_resid_post" / "sae_weights.safetensors").is_file()
    assert not (tmp_path / "sp" / "layers.0").exists()


def _their_sparsify_bank(folder, d, n, k, layers):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(1)
    for layer in layers:
        sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.encoder.bias.normal_(0, 0.1)
        sae.save_to_disk(folder / f"layers.{layer}")


def _their_saelens_bank(folder, d, n, k, layers, apply_b_dec_to_input=True):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(2)
    for layer in layers:
        cfg = TopKSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu", apply_b_dec_to_input=apply_b_dec_to_input)
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae = TopKSAE(cfg)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(0, 0.1)
        sae.save_model(folder / f"blocks.{layer}.hook_resid_post")


@pytest.mark.parametrize("fmt", ["sparsify", "saelens", "saelens-no-b-dec-in"])
def test_their_freshly_initialised_saes_import_as_a_per_layer_run_that_reconstructs_as_they_do(tmp_path, model, acts, fmt):
    from sae_lens import SAE
    from sparsify import SparseCoder

    layers = [0, 2]
    if fmt == "sparsify":
        _their_sparsify_bank(tmp_path / "bank", 32, 64, 5, layers)
    else:
        _their_saelens_bank(tmp_path / "bank", 32, 64, 5, layers, apply_b_dec_to_input=fmt == "saelens")
    run = import_bank(tmp_path / "bank", model, tmp_path / "run")
    coder, meta = load_coder(run, model_fingerprint=model.fingerprint())
    assert coder.layers == layers and meta["imported"]["format"] == fmt.split("-")[0] and meta["finished"]
    with torch.no_grad():
        ours = coder(acts[:, [0, 2]]).x_hat
        for i, layer in enumerate(layers):
            if fmt == "sparsify":
                sp = SparseCoder.load_from_disk(tmp_path / "bank" / f"layers.{layer}")
                enc = sp.encode(acts[:, layer])
                theirs = sp.decode(enc.top_acts, enc.top_indices)
            else:
                sl = SAE.load_from_disk(str(tmp_path / "bank" / f"blocks.{layer}.hook_resid_post"))
                theirs = sl.decode(sl.encode(acts[:, layer]))
            assert torch.allclose(ours[:, i], theirs, atol=1e-4, rtol=1e-4), (layer, (ours[:, i] - theirs).abs().max())


def test_an_imported_bank_is_evaluated_like_a_run_trained_here(tmp_path, model, cache):
    from mlsae.evaluate import evaluate

    _their_sparsify_bank(tmp_path / "bank", 32, 64, 5, [0, 1, 2])
    run = import_bank(tmp_path / "bank", model, tmp_path / "run", ctx=32)
    table = evaluate(run, str(cache), 300, 0, model=model, device="cpu", progress=False)
    assert table.column("layer").to_pylist()[:3] == ["0", "1", "2"]
    assert all(0 < v < 100 for v in table.column("fvu").to_pylist()[:3])


def test_import_refuses_an_sae_of_another_width_and_an_occupied_run_folder(tmp_path, model):
    _their_sparsify_bank(tmp_path / "bank", 16, 64, 5, [0])
    with pytest.raises(MlsaeError, match="read vectors of 16, but .* has d_model 32"):
        import_bank(tmp_path / "bank", model, tmp_path / "run")
    _their_sparsify_bank(tmp_path / "bank32", 32, 64, 5, [0])
    import_bank(tmp_path / "bank32", model, tmp_path / "run")
    with pytest.raises(MlsaeError, match="already holds a run; pass --overwrite"):
        import_bank(tmp_path / "bank32", model, tmp_path / "run")
