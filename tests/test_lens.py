"""The tuned lens: translators, their exact inverse, our file format and the tuned-lens package's."""

import json

import pytest
import torch

from mlsae.errors import MlsaeError
from mlsae.lens import TunedLens, load_lens
from mlsae.transforms import LensTransform


def random_lens(n_blocks=4, d=6, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(n_blocks, d)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(n_blocks, d, d, generator=g) * scale)
        lens.bias.copy_(torch.randn(n_blocks, d, generator=g))
        lens.weight[-1].zero_()
        lens.bias[-1].zero_()
    return lens


def test_the_inverse_is_exact_and_the_translator_is_x_plus_wx_plus_b():
    torch.manual_seed(1)
    lens = random_lens()
    t = LensTransform.from_lens(lens, [0, 2, 3])
    x = torch.randn(20, 3, 6, dtype=torch.float64)
    y, state = t(x)
    W, b = lens.weight.detach().double(), lens.bias.detach().double()
    for j, layer in enumerate([0, 2, 3]):
        assert torch.allclose(y[:, j], x[:, j] + x[:, j] @ W[layer].T + b[layer], atol=1e-6)
    assert torch.allclose(t.inverse(y, state), x, atol=1e-5)
    assert torch.allclose(t.inverse_delta(t.forward_delta(x, state), state), x, atol=1e-5)
    assert torch.equal(y[:, 2], x[:, 2])  # the last block: the identity


def test_an_identity_lens_changes_nothing_bit_for_bit():
    t = LensTransform.from_lens(TunedLens(3, 5), [0, 1, 2])
    x = torch.randn(10, 3, 5)
    y, state = t(x)
    assert torch.equal(y, x) and torch.equal(t.inverse(y, state), x)


def test_only_the_last_blocks_translator_stays_the_identity_in_training():
    lens = TunedLens(3, 4)
    x = torch.randn(5, 3, 4)
    lens.translate(x, [0, 1, 2]).pow(2).sum().backward()
    assert lens.weight.grad[:2].abs().sum() > 0 and lens.weight.grad[2].abs().sum() == 0 and lens.bias.grad[2].abs().sum() == 0


def test_our_format_round_trips_with_its_hash(tmp_path):
    lens = random_lens()
    h = lens.save(tmp_path / "lens", "tiny", "fp")
    loaded, meta = load_lens(tmp_path / "lens")
    assert meta["hash"] == h and meta["model_fingerprint"] == "fp"
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)


def write_tuned_lens_package_layout(folder, weights, biases, prefix=""):
    """The tuned-lens package's layout: translator i reads hidden state i (0 = the embeddings)."""
    folder.mkdir(parents=True)
    n, d = len(weights), weights[0].shape[0]
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n, "bias": True,
        "base_model_revision": None, "unembed_hash": "x", "lens_type": "linear_tuned_lens"}))
    state = {}
    for i, (w, b) in enumerate(zip(weights, biases)):
        state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"] = w, b
    torch.save(state, folder / "params.pt")


@pytest.mark.parametrize("prefix", ["", "layer_translators."])
def test_a_lens_in_the_tuned_lens_package_layout_maps_index_i_to_block_i_minus_1(tmp_path, prefix):
    n, d = 4, 5
    weights = [torch.full((d, d), float(i)) for i in range(n)]  # translator i's weight is all i
    biases = [torch.full((d,), 10.0 + i) for i in range(n)]
    write_tuned_lens_package_layout(tmp_path / "tl", weights, biases, prefix)
    lens, meta = load_lens(tmp_path / "tl")
    assert meta["source"] == "tuned-lens" and lens.n_blocks == n
    for block in range(n - 1):  # block l's output is hidden state l + 1
        assert torch.all(lens.weight[block] == block + 1) and torch.all(lens.bias[block] == 11.0 + block)
    assert torch.all(lens.weight[n - 1] == 0) and torch.all(lens.bias[n - 1] == 0)  # the last block: identity


def test_bad_lens_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    write_tuned_lens_package_layout(tmp_path / "tl", [torch.zeros(3, 3)] * 2, [torch.zeros(3)] * 2)
    torch.save({"0.weight": Evil()}, tmp_path / "tl" / "params.pt")
    with pytest.raises(MlsaeError, match="is not a plain tensor file"):
        load_lens(tmp_path / "tl")
    with pytest.raises(MlsaeError, match="holds no lens"):
        load_lens(tmp_path)
    singular = TunedLens(3, 4)
    with torch.no_grad():
        singular.weight[1] = -torch.eye(4)
    with pytest.raises(MlsaeError, match="translator at layer 1 is singular"):
        LensTransform.from_lens(singular, [0, 1])
    with pytest.raises(MlsaeError, match="the lens has 3 blocks, not layer 5"):
        LensTransform.from_lens(TunedLens(3, 4), [0, 5])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_unembed_of_the_last_block_is_the_models_own_logits(arch):
    from conftest import tiny_model

    model = tiny_model(arch, n_layers=2)
    ids = torch.randint(3, model.vocab_size, (2, 9))
    last = model.capture(ids, [1])[:, :, 0]
    assert torch.allclose(model.unembed(last), model.logits(ids), atol=1e-4)


def test_a_briefly_trained_lens_beats_the_logit_lens_at_every_block():
    from conftest import tiny_model
    from mlsae.lens import lens_kl, train_lens
    from mlsae.text import pack_windows

    model = tiny_model("llama", n_layers=4, seed=2)
    text = [f"Line {i}: a small model reads some text and predicts {i % 13} things." for i in range(200)]
    train = list(pack_windows(text, model.tokenizer, 32))
    lens, train_kl = train_lens(model, iter(train * 4), tokens=4000, lr=3e-3, progress=False)
    assert len(train_kl) == 4 and train_kl[-1] == 0  # the last block has no translator
    logit, tuned = lens_kl(model, lens, iter(train[:6]), tokens=150)
    for block in range(3):
        assert tuned[block] < logit[block], (block, tuned, logit)
    assert tuned[3] == pytest.approx(logit[3])  # the identity: the model's own read-out
    assert logit[3] == pytest.approx(0, abs=1e-5)


def test_lens_train_and_eval_from_the_command_line(tmp_path, capsys):
    import pyarrow.parquet as pq

    from conftest import tiny_model
    from mlsae.cli import main

    model = tiny_model("llama", n_layers=3, seed=4)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("a lens reads each layer as the model's final answer. " * 200)
    common = ["--model", str(tmp_path / "m"), "--data", str(text), "--ctx", "32", "--device", "cpu", "--windows-per-batch", "4"]
    assert main(["lens", "train", *common, "--tokens", "1500", "--lr", "0.003", "--out", str(tmp_path / "lens")]) == 0
    assert "lens trained on 1,500 tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "lens" / "train.json").read_text())["tokens"] == 1500
    assert main(["lens", "eval", *common, "--tokens", "200", "--out", str(tmp_path / "lens")]) == 0
    kl = pq.read_table(tmp_path / "lens" / "kl.parquet").to_pylist()
    assert len(kl) == 3 and all(r["kl_tuned_lens"] < r["kl_logit_lens"] for r in kl[:2])
    capsys.readouterr()
    assert main(["lens", "train", *common, "--tokens", "100", "--out", str(tmp_path / "lens")]) == 2
    assert "already holds a lens; pass --overwrite" in capsys.readouterr().err
    assert main(["lens", "eval", *common, "--layers", "1", "--out", str(tmp_path / "lens")]) == 2
    assert "--layers: a lens has a translator for every block" in capsys.readouterr().err
    other = tiny_model("llama", n_layers=3, seed=9)
    other.model.save_pretrained(tmp_path / "m2")
    other.tokenizer.save_pretrained(tmp_path / "m2")
    assert main(["lens", "eval", *common[2:], "--model", str(tmp_path / "m2"), "--out", str(tmp_path / "lens")]) == 2
    assert "was trained on another model" in capsys.readouterr().err
    assert main(["lens", "fit", *common, "--out", str(tmp_path / "x")]) == 2
    assert "expected one of train, eval" in capsys.readouterr().err


def test_training_with_a_lens_identity_equals_no_lens_and_a_changed_lens_is_refused(tmp_path):
    """An identity lens gives a bit-identical run; a trained lens changes the coder's input; a
    lens for another model or changed since the run recorded it is refused."""
    from safetensors.torch import load_file

    from conftest import tiny_model
    from mlsae.config import TrainConfig
    from mlsae.lens import TunedLens
    from mlsae.train import train

    model = tiny_model("llama", n_layers=3, seed=0)
    text = tmp_path / "t.txt"
    text.write_text("the lens translates each layer before the coder reads it. " * 120)

    def cfg(out, **kw):
        base = dict(out=str(tmp_path / out), data=str(text), expansion_factor=2, k=4, tokens=256, tokens_per_step=64,
                    micro_batch_tokens=64, lr=3e-3, ctx=32, device="cpu", init_tokens=64, decoder_impl="sparse")
        return TrainConfig(**{**base, **kw})

    TunedLens(3, model.d_model).save(tmp_path / "identity", model.name, model.fingerprint())
    random_lens(3, model.d_model, seed=3, scale=0.05).save(tmp_path / "lens", model.name, model.fingerprint())
    train(cfg("plain"), model=model)
    train(cfg("identity", lens=str(tmp_path / "identity")), model=model)
    train(cfg("lensed", lens=str(tmp_path / "lens")), model=model)
    plain, ident, lensed = (load_file(str(tmp_path / n / "sae.safetensors")) for n in ("plain", "identity", "lensed"))
    assert torch.equal(plain["sae.W_enc"], ident["sae.W_enc"]) and torch.equal(plain["sae.W_dec"], ident["sae.W_dec"])
    assert not torch.equal(plain["sae.W_enc"], lensed["sae.W_enc"])
    meta = json.loads((tmp_path / "lensed" / "config.json").read_text())
    assert meta["lens"]["source"] == "mlsae" and len(meta["lens"]["sha256"]) == 64
    assert meta["transforms"][0] == "tuned_lens"
    from mlsae.sae import load_coder

    coder, _ = load_coder(tmp_path / "lensed")
    assert torch.allclose(coder.transform.steps[0].weight, random_lens(3, model.d_model, seed=3, scale=0.05).weight.detach())
    # evaluation reports FVU in the lens's space beside the model's; an identity lens reads the same
    from mlsae.analyze import analyze
    from mlsae.evaluate import evaluate

    e_id = evaluate(tmp_path / "identity", str(text), tokens=100, downstream_tokens=0, model=model, device="cpu", progress=False)
    e_lens = evaluate(tmp_path / "lensed", str(text), tokens=100, downstream_tokens=0, model=model, device="cpu", progress=False)
    assert e_id.column("fvu_lens").to_pylist() == pytest.approx(e_id.column("fvu").to_pylist(), rel=1e-9)
    assert e_id.column("fvu_lens_standardized").to_pylist() == pytest.approx(e_id.column("fvu_standardized").to_pylist(), rel=1e-9)
    assert e_lens.column("fvu_lens").to_pylist() != pytest.approx(e_lens.column("fvu").to_pylist(), rel=1e-6)
    assert "fvu_lens" not in evaluate(tmp_path / "plain", str(text), tokens=50, downstream_tokens=0, model=model, device="cpu",
                                      progress=False).column_names
    summary = analyze(tmp_path / "lensed", str(text), tokens=100, model=model, device="cpu", progress=False)
    plain_summary = analyze(tmp_path / "identity", str(text), tokens=100, model=model, device="cpu", progress=False)
    assert summary["drift"]["mean_cosine"] != pytest.approx(plain_summary["drift"]["mean_cosine"])  # read through the lens
    from mlsae.report import build_report

    html = build_report(tmp_path / "lensed", compare=[tmp_path / "identity"]).read_text()
    assert "<h2>Tuned lens</h2>" in html and "mlsae lens eval" in html  # the KL table is missing: says how to fill it
    assert "Runs side by side" in html and "fvu_lens" in html
    # refused: another model's lens; a lens changed since the run recorded it
    other = tiny_model("llama", n_layers=3, seed=7)
    TunedLens(3, other.d_model).save(tmp_path / "other", other.name, other.fingerprint())
    with pytest.raises(MlsaeError, match="was trained on another model"):
        train(cfg("x", lens=str(tmp_path / "other")), model=model)
    assert not (tmp_path / "x").exists()
    random_lens(3, model.d_model, seed=4).save(tmp_path / "lens", model.name, model.fingerprint())
    with pytest.raises(MlsaeError, match="is not the lens this run was trained with"):
        train(cfg("lensed", lens=str(tmp_path / "lens"), tokens=320, resume=True), model=model)


@pytest.mark.parametrize("arch", ["per-layer", "concat"])
def test_every_arrangement_trains_through_a_lens(tmp_path, arch):
    from conftest import tiny_model
    from mlsae.config import TrainConfig
    from mlsae.sae import load_coder
    from mlsae.train import train

    model = tiny_model("llama", n_layers=3, seed=0)
    (tmp_path / "t.txt").write_text("every arrangement reads through the lens. " * 100)
    lens = random_lens(3, model.d_model, seed=5, scale=0.05)
    lens.save(tmp_path / "lens", model.name, model.fingerprint())
    train(TrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "t.txt"), arch=arch, n_latents=48, k=4, tokens=128,
                      tokens_per_step=64, micro_batch_tokens=64, ctx=32, device="cpu", init_tokens=64, lens=str(tmp_path / "lens"),
                      layers=[0, 2]), model=model)
    coder, meta = load_coder(tmp_path / "run")
    assert meta["transforms"][0] == "tuned_lens"
    assert torch.allclose(coder.transform.steps[0].weight, lens.weight.detach()[[0, 2]])
    x = model.capture(torch.randint(3, model.vocab_size, (1, 10)), [0, 2])[0]
    with torch.no_grad():
        out = coder(x)
    y, state = coder.transform(x)
    assert torch.allclose(coder.transform.inverse(y, state), x, atol=1e-4) and out.x_hat.shape == x.shape


def test_the_lens_gradient_is_the_batch_mean_of_the_kl_whatever_the_chunk(monkeypatch):
    """Accumulated chunk by chunk (bounded memory), the gradient equals a plain formula on the whole
    batch: the mean over positions and translated blocks of KL(p_model || p_lens), with the
    model's own logits as p_model."""
    from conftest import tiny_model
    from mlsae import lens as lens_module

    model = tiny_model("llama", n_layers=3, seed=4)
    ids = torch.randint(3, model.vocab_size, (2, 11))
    hidden = model.capture(ids).flatten(0, 1)  # [22, blocks, d]
    lens = random_lens(n_blocks=3, d=model.d_model, seed=1, scale=0.05)
    target = torch.log_softmax(model.logits(ids).flatten(0, 1), -1)
    plain = 0
    for block in range(2):
        translated = hidden[:, block] + hidden[:, block] @ lens.weight[block].T + lens.bias[block]
        logp = torch.log_softmax(model.unembed(translated), -1)
        plain = plain + (target.exp() * (target - logp)).sum(-1).mean() / 2
    want_w, want_b = torch.autograd.grad(plain, [lens.weight, lens.bias])
    monkeypatch.setattr(lens_module, "CHUNK_ROWS", 5)  # 22 rows: chunks of 5, the last of 2
    kl_sum = torch.zeros(3, dtype=torch.float64)
    lens_module._backward(model, lens, hidden, kl_sum)
    assert want_w.abs().sum() > 0
    assert torch.allclose(lens.weight.grad, want_w, rtol=1e-4, atol=1e-7)
    assert torch.allclose(lens.bias.grad, want_b, rtol=1e-4, atol=1e-7)
    assert float(kl_sum[0] + kl_sum[1]) / 22 / 2 == pytest.approx(float(plain), rel=1e-5) and kl_sum[2] == 0
