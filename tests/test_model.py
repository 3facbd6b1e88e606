import sys

import pytest
import torch
import transformers

from conftest import ARCHS, char_tokenizer, tiny_config, tiny_model
from mlsae.errors import MlsaeError
from mlsae.model import ResidualModel, load_model, special_token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_block_outputs_and_last_layer_is_pre_norm(arch):
    model = tiny_model(arch, n_layers=3)
    ids = torch.randint(4, 90, (2, 12))
    acts = model.capture(ids)  # [batch, pos, layers, d]
    assert acts.shape == (2, 12, 3, 32)
    out = model.model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, block 0 .. block L-2, final-normed block L-1
    for layer in range(2):
        torch.testing.assert_close(acts[:, :, layer], hidden[layer + 1], rtol=0, atol=0)
    # The last captured layer is the raw block output: the final norm of it gives HF's last state,
    # and it differs from that state.
    last = acts[:, :, -1]
    torch.testing.assert_close(model.final_norm(last), hidden[-1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(last, hidden[-1], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_manual_block_by_block_forward(arch):
    """Blocks called one by one on their own (eager attention, explicit causal mask) agree."""
    torch.manual_seed(0)
    cfg = tiny_config(arch, n_layers=3)
    cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = ResidualModel(hf, char_tokenizer(), "tiny")
    ids = torch.randint(4, 90, (1, 9))
    pos = torch.arange(9)[None]
    mask = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        if arch == "llama":
            h = hf.model.embed_tokens(ids)
            rope = hf.model.rotary_emb(h, pos)
            kwargs = dict(attention_mask=mask, position_embeddings=rope, position_ids=pos)
        else:
            h = hf.transformer.wte(ids) + hf.transformer.wpe(pos)
            kwargs = dict(attention_mask=mask)
        manual = []
        for block in model.blocks:
            out = block(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            manual.append(h)
    torch.testing.assert_close(model.capture(ids), torch.stack(manual, 2), rtol=1e-5, atol=1e-5)


def test_capture_subset_stops_after_last_needed_block():
    model = tiny_model("llama", n_layers=4)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    ids = torch.randint(4, 90, (1, 8))
    sub = model.capture(ids, layers=[2, 0])
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2]
    full = model.capture(ids)
    torch.testing.assert_close(sub, full[:, :, [0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_from_unchanged_residual_reproduces_logits_exactly(arch):
    model = tiny_model(arch, n_layers=3)
    ids = torch.randint(4, 90, (2, 10))
    acts = model.capture(ids)
    clean = model.logits(ids)
    for layer in range(3):
        assert torch.equal(model.logits_from(layer, acts[:, :, layer], ids), clean)
    # the blocks are restored afterwards
    assert torch.equal(model.logits(ids), clean)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_from_a_modified_residual_equals_a_forward_with_that_layer_replaced(arch):
    """A changed residual (not the clean one, which would pass even if it were ignored) gives
    the logits of a full forward whose block output is replaced by a hook, at every layer."""
    model = tiny_model(arch, n_layers=3)
    ids = torch.randint(4, 90, (2, 10))
    acts = model.capture(ids)
    g = torch.Generator().manual_seed(0)
    for layer in range(3):
        modified = acts[:, :, layer] * 0.7 + torch.randn(acts[:, :, layer].shape, generator=g)

        def replace(module, args, output, modified=modified):
            return (modified,) + tuple(output[1:]) if isinstance(output, tuple) else modified

        handle = model.blocks[layer].register_forward_hook(replace)
        try:
            reference = model.logits(ids)
        finally:
            handle.remove()
        spliced = model.logits_from(layer, modified, ids)
        torch.testing.assert_close(spliced, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(spliced, model.logits(ids), atol=1e-3)  # the replacement mattered


def test_logits_from_skips_earlier_blocks_and_uses_the_replacement():
    model = tiny_model("llama", n_layers=3)
    ids = torch.randint(4, 90, (1, 8))
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    zeros = torch.zeros(1, 8, 32)
    spliced = model.logits_from(1, zeros, ids)
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2]  # hooks fire, but blocks 0-1 return at once
    assert not torch.allclose(spliced, model.logits(ids))
    # same as feeding zeros into block 2 by hand
    manual = model.model(input_ids=ids, output_hidden_states=True)
    assert manual.logits.shape == spliced.shape


def test_unsupported_architecture_names_the_class():
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50, word_embed_proj_dim=16)
    )
    with pytest.raises(MlsaeError, match="OPTForCausalLM is not supported; supported: .*LlamaForCausalLM"):
        ResidualModel(hf, char_tokenizer(), "opt")


def test_layer_out_of_range():
    model = tiny_model("gpt2", n_layers=3)
    with pytest.raises(MlsaeError, match="layer 3 is out of range; tiny-gpt2 has 3 blocks"):
        model.capture(torch.zeros(1, 4, dtype=torch.long), layers=[0, 3])


def test_load_local_folder_and_missing_paths(tmp_path):
    model = tiny_model("gpt_neox", n_layers=2)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    ids = torch.randint(4, 90, (1, 6))
    torch.testing.assert_close(loaded.capture(ids), model.capture(ids))
    assert loaded.fingerprint() == model.fingerprint()
    assert special_token_ids(loaded.tokenizer) == {0, 1, 2}
    with pytest.raises(MlsaeError, match="model file .*nope.gguf does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(MlsaeError, match="has no config.json"):
        (tmp_path / "empty").mkdir()
        load_model(str(tmp_path / "empty"))
    with pytest.raises(MlsaeError, match="is not a folder, a .gguf file or a hub id"):
        load_model(str(tmp_path / "missing" / "folder"))


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MlsaeError, match="needs the 'gguf' package"):
        load_model(str(tmp_path / "m.gguf"))


def test_fingerprint_differs_between_models():
    assert tiny_model("llama", seed=0).fingerprint() != tiny_model("llama", seed=1).fingerprint()
