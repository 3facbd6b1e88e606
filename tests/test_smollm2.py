"""Integration on the real SmolLM2-135M GGUF in ../shared/assets."""

import json

import torch

from conftest import CORPUS, needs_assets
from mlsae.text import iter_documents, pack_windows

pytestmark = needs_assets


def test_real_model_capture_is_pre_norm_and_splicing_is_exact(smollm2):
    assert (smollm2.n_layers, smollm2.d_model) == (30, 576)
    windows = list(pack_windows(iter_documents(str(CORPUS / "test" / "brown.jsonl")), smollm2.tokenizer, 64))[:2]
    ids = torch.stack(windows)
    acts = smollm2.capture(ids)
    assert acts.shape == (2, 64, 30, 576) and torch.isfinite(acts).all()
    out = smollm2.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(acts[:, :, 10], out.hidden_states[11], rtol=0, atol=0)
    torch.testing.assert_close(smollm2.final_norm(acts[:, :, -1]), out.hidden_states[-1], rtol=1e-5, atol=1e-4)
    assert torch.equal(smollm2.logits_from(20, acts[:, :, 20], ids), out.logits)
    # a real model predicts real text far better than chance (ln 49152 = 10.8 nats)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert ce < 5.0
    # the first position is the attention sink: huge norm in the middle layers
    norms = acts.norm(dim=-1)  # [batch, pos, layers]
    assert norms[:, 0, 20].min() > 20 * norms[:, 1:, 20].median()


def test_cache_cli_on_real_model(tmp_path, smollm2):
    from mlsae.cli import main

    out = tmp_path / "cache"
    code = main(["cache", "--model", "smollm2", "--data", str(CORPUS / "test" / "fortunes.jsonl"),
                 "--tokens", "300", "--ctx", "128", "--layers", "0", "29", "--dtype", "bfloat16", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [0, 29] and manifest["n_tokens"] == 300
    assert manifest["model_fingerprint"] == smollm2.fingerprint()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_train_and_evaluate_on_real_model(tmp_path, smollm2):
    from mlsae.config import TrainConfig
    from mlsae.evaluate import evaluate
    from mlsae.train import train

    data = str(CORPUS / "test" / "inaugural.jsonl")
    cfg = TrainConfig(model="smollm2", data=data, layers=[3, 29], ctx=128, tokens=2048, expansion_factor=1, k=8,
                      tokens_per_step=128, micro_batch_tokens=128, lr=1e-2, device="cpu", out=str(tmp_path / "run"))
    result = train(cfg, model=smollm2)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["tokens"] == 2048 and result["fvu"] < 0.8 * first["fvu"]
    # centred layers and b_pre at the geometric median: the coder starts below predicting the mean
    assert first["step"] == 0 and first["fvu"] < 1.0
    table = evaluate(tmp_path / "run", data, tokens=300, downstream_tokens=120, model=smollm2, device="cpu", progress=False)
    assert table.column("layer").to_pylist() == ["3", "29", "mean"]
    fvu = table.column("fvu").to_pylist()
    assert all(0 < v < 2.0 for v in fvu)
    # a reconstruction hurts less than zero-ablating the layer
    assert all(s < z for s, z in zip(table.column("ce").to_pylist(), table.column("ce_zero").to_pylist()))
    assert all(k >= 0 for k in table.column("kl").to_pylist())


def test_demo_runs_the_whole_chain(tmp_path, smollm2, monkeypatch, capsys):
    import mlsae.model
    from mlsae.cli import main

    monkeypatch.setattr(mlsae.model, "load_model", lambda *a, **k: smollm2)  # reuse the loaded model
    code = main(["demo", "--out", str(tmp_path / "demo"), "--tokens", "1024", "--eval-tokens", "512",
                 "--downstream-tokens", "100", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    page = tmp_path / "demo" / "smollm2-mlsae" / "report" / "index.html"
    assert page.is_file() and str(page.resolve()) in out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "variance ratio"):
        assert step in out
