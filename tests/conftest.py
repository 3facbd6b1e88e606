"""Shared fixtures: tiny random models of each architecture, a character tokenizer, the real assets."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mlsae.model import ResidualModel

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
SMOLLM2 = SHARED_ASSETS / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = SHARED_ASSETS / "corpus"

if SHARED_ASSETS.is_dir():
    os.environ.setdefault("MLSAE_ASSETS_DIR", str(SHARED_ASSETS))

@pytest.fixture(autouse=True, scope="session")
def _user_cache(tmp_path_factory):
    """Tests write nothing into the user's cache (reused ablation baselines): a fresh one per session."""
    os.environ["MLSAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))


needs_assets = pytest.mark.skipif(
    not SMOLLM2.is_file(), reason="needs ../shared/assets (the real SmolLM2 GGUF and corpus) beside the checkout"
)

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + list(string.printable)


def char_tokenizer(add_bos: bool = True) -> transformers.PreTrainedTokenizerFast:
    """One token per character; ids 0/1/2 are PAD/BOS/EOS."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decoding joins the characters back into the text
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(arch: str, n_layers: int = 3, d: int = 32):
    common = dict(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(
        num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * d, max_position_embeddings=256, **common,
    )
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=n_layers, n_embd=d, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4, intermediate_size=2 * d,
            max_position_embeddings=256, **common,
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }
    extra = {"head_dim": d // 4} if arch.startswith(("gemma", "qwen3")) else {}
    return classes[arch](**llama_like, **extra)


ARCHS = ["gpt2", "gpt_neox", "llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "mistral"]


def tiny_model(arch: str = "llama", n_layers: int = 3, seed: int = 0, add_bos: bool = True) -> ResidualModel:
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, n_layers))
    # Random weights give near-uniform predictions; larger embeddings make the layers matter.
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(20)
    return ResidualModel(hf.float().eval(), char_tokenizer(add_bos), f"tiny-{arch}")


@pytest.fixture(scope="session")
def smollm2() -> ResidualModel:
    if not SMOLLM2.is_file():
        pytest.skip("needs ../shared/assets (the real SmolLM2 GGUF) beside the checkout")
    from mlsae.model import load_model

    return load_model(str(SMOLLM2), device="cpu")


EXPLORER_LAYERS = [0, 2, 3]
EXPLORER_TEXT = [f"Paragraph {i}: the library reads files, parses {i % 11} records and writes tables." for i in range(200)]


@pytest.fixture(scope="session")
def explorer_runs(tmp_path_factory) -> dict[str, Path]:
    """Runs for the explorer on a tiny model saved to a folder (so the server loads it as a user's
    would), reading layers 0, 2 and 3 of four (a layer's number is not its position): an MLSAE and
    a concat run, evaluated and analysed; a per-layer bank analysed only; an MLSAE never analysed.
    Also ``text``: the held-out text, and ``model``: the model folder."""
    import json

    from mlsae.analyze import analyze
    from mlsae.config import TrainConfig
    from mlsae.evaluate import evaluate
    from mlsae.train import train

    folder = tmp_path_factory.mktemp("explorer")
    model = tiny_model("llama", n_layers=4, seed=4)
    model.model.save_pretrained(folder / "model")
    model.tokenizer.save_pretrained(folder / "model")
    model.name = str(folder / "model")  # the runs record the folder: the server loads the model from it
    text = folder / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in EXPLORER_TEXT))
    runs = {"text": text, "model": folder / "model"}
    for name, arch, evaluated, analysed in (("mlsae", "mlsae", True, True), ("concat", "concat", True, True),
                                            ("per-layer", "per-layer", False, True), ("bare", "mlsae", False, False)):
        out = runs[name] = folder / name
        train(TrainConfig(out=str(out), data=str(text), arch=arch, layers=EXPLORER_LAYERS, expansion_factor=2, k=4, tokens=384, tokens_per_step=64,
                          micro_batch_tokens=64, lr=3e-3, ctx=24, device="cpu", shuffle_buffer_mb=1), model=model)
        if evaluated:
            evaluate(out, str(text), 300, 50, ctx=24, model=model, device="cpu", progress=False)
        if analysed:
            analyze(out, str(text), tokens=300, model=model, device="cpu", progress=False)
    return runs
