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
