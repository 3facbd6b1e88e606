"""The whole training pipeline on a random-weight GPT-NeoX of Pythia-160m's shape (12 layers,
d 768): tokens/s of the model's capture alone and of `train` live, on a GPU or the CPU.

    python benchmarks/bench_pipeline.py --device cuda [--tokens 262144] [--model-dtype bfloat16] [--coder-dtype bfloat16]
    python benchmarks/bench_pipeline.py --device cpu --tokens 4096          # a smoke run

No weights can be downloaded where this runs: the model is built from its config with random
weights (what it computes does not matter to the speed) and a byte-level tokenizer, saved to a
temporary folder, and loaded the way `mlsae train --model FOLDER` loads it. The text is the
built-in corpus. Prints a table and writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlsae.config import TrainConfig
from mlsae.model import load_model
from mlsae.text import iter_documents, pack_windows
from mlsae.train import train

RESULTS = Path(__file__).parent / "results"
PYTHIA_160M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
                   max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0, eos_token_id=0)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Bytes as tokens (ids 0-255), the end-of-text token after them."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build(folder: Path) -> None:
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**PYTHIA_160M))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--expansion-factor", type=int, default=16)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--coder-dtype", default="float32")
    ap.add_argument("--data", default="builtin:pydocs")
    ap.add_argument("--json", default=str(RESULTS / "pipeline.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pythia-160m-shape"
        build(folder)
        model = load_model(str(folder), device=args.device, dtype=args.model_dtype)
        windows = list(pack_windows(iter_documents(args.data), model.tokenizer, args.ctx))
        n = max(1, min(len(windows), args.tokens // args.ctx))
        per_batch = max(1, args.micro_batch_tokens // args.ctx)
        model.capture(windows[0][None, :16].to(model.device))  # warm up
        started = time.perf_counter()
        for i in range(0, n, per_batch):
            model.capture(torch.stack(windows[i : i + per_batch]).to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        capture = n * args.ctx / (time.perf_counter() - started)
        result = train(TrainConfig(
            model=str(folder), data=args.data, ctx=args.ctx, tokens=args.tokens, device=args.device, model_dtype=args.model_dtype,
            coder_dtype=args.coder_dtype, expansion_factor=args.expansion_factor, k=32, lr=1e-4,
            tokens_per_step=max(args.micro_batch_tokens, 8192), micro_batch_tokens=args.micro_batch_tokens,
            windows_per_batch=per_batch, out=str(Path(tmp) / "run"), checkpoint_tokens=10**12,
        ), model=model)
    rows = [{"what": "capture alone (12 layers)", "tokens_per_s": capture},
            {"what": f"train live, MLSAE R {args.expansion_factor}", "tokens_per_s": result["tokens_per_s"], "final_fvu": result["fvu"]}]
    for r in rows:
        print(f"{r['what']:<32} {r['tokens_per_s']:>10.0f} tokens/s")
    meta = {**vars(args), "model": "GPT-NeoX, Pythia-160m's shape, random weights", "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
