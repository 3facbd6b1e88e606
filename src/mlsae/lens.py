"""The tuned lens (Belrose et al. 2023): one affine translator per layer, x' = x + W_l x + b_l.

Lawson et al. (section 3.3, eqs. 8-9) pass each layer's residual vector through its
translator before the encoder and map the decoder's output back with
x_hat = (I + W_l)^-1 (x_hat' - b_l), the inverse computed once. Here a lens is an input
transform (:class:`mlsae.transforms.LensTransform`), so training, evaluation and analysis all reach the same
space through the coder.

Layer numbering. Ours is the output of block l (0-based), the last block's taken before the
final norm. The tuned-lens package indexes hidden states with 0 = the embeddings, so block l's
output is its index l + 1, read by its translator l + 1; the last block's output has no
translator (the model's own final norm and unembedding read it: the identity). A lens here
holds one translator per block, the last one fixed at the identity.

Files: ``lens.safetensors`` (``weight [blocks, d, d]``, ``bias [blocks, d]``, nn.Linear's
convention: x' = x + x W^T + b) and ``lens.json`` (model, fingerprint, sizes). A lens is known
by the sha256 of its weights file; a run records it and refuses another.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import save_json
from .errors import MlsaeError
from .integrity import check_tensors, sha256
from .model import ResidualModel, special_token_ids
from .text import keep_mask

LENS_FORMAT = 1


class TunedLens(nn.Module):
    """Translators for every block of a model; the last block's is the identity and never trained."""

    def __init__(self, n_blocks: int, d_model: int):
        super().__init__()
        if n_blocks < 1 or d_model < 1:
            raise MlsaeError(f"a lens needs at least one block and one dimension, got {n_blocks} blocks of {d_model}")
        self.weight = nn.Parameter(torch.zeros(n_blocks, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_blocks, d_model))
        self.weight.register_hook(self._keep_last_identity)
        self.bias.register_hook(self._keep_last_identity)

    @staticmethod
    def _keep_last_identity(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[-1] = 0
        return grad

    @property
    def n_blocks(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    def translate(self, x: Tensor, layers: Sequence[int]) -> Tensor:
        """``x: [..., len(layers), d]`` -> x + x W_l^T + b_l at each layer."""
        W, b = self.weight[list(layers)], self.bias[list(layers)]
        return x + torch.einsum("...ld,lod->...lo", x, W) + b

    def save(self, folder: str | Path, model_name: str, model_fingerprint: str) -> str:
        """Write the lens; returns its hash (the sha256 of the weights file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "lens.safetensors.tmp"
        save_file({"weight": self.weight.detach().contiguous().cpu(), "bias": self.bias.detach().contiguous().cpu()}, str(tmp))
        tmp.replace(folder / "lens.safetensors")
        save_json(folder / "lens.json", {"format": LENS_FORMAT, "model": model_name, "model_fingerprint": model_fingerprint,
                                         "n_blocks": self.n_blocks, "d_model": self.d_model})
        return sha256(folder / "lens.safetensors")


def load_lens(folder: str | Path) -> tuple[TunedLens, dict]:
    """A lens saved here (``lens.json``) or by the tuned-lens package (``config.json`` and
    ``params.pt``, read without executing code from the file), mapped to our block numbering.
    The metadata says where it came from and, for ours, the model it was trained on."""
    folder = Path(folder)
    if (folder / "lens.json").is_file():
        meta = json.loads((folder / "lens.json").read_text())
        state = load_file(str(folder / "lens.safetensors"))
        lens = TunedLens(meta["n_blocks"], meta["d_model"])
        _load(lens, state, folder / "lens.safetensors")
        return lens, {**meta, "source": "mlsae", "hash": sha256(folder / "lens.safetensors")}
    if (folder / "config.json").is_file() and (folder / "params.pt").is_file():
        return _load_tuned_lens_package(folder)
    raise MlsaeError(f"{folder} holds no lens: expected lens.json and lens.safetensors, or the tuned-lens package's config.json and params.pt")


def _load(lens: TunedLens, state: dict, path: Path) -> None:
    check_tensors(lens.state_dict(), state, path)
    lens.load_state_dict({k: state[k] for k in ("weight", "bias")})


def _load_tuned_lens_package(folder: Path) -> tuple[TunedLens, dict]:
    """The package's translator i reads hidden state i (0 = the embeddings): our block i - 1.
    Its key names are ``{i}.weight`` / ``{i}.bias`` (``layer_translators.`` prefixed in some files)."""
    config = json.loads((folder / "config.json").read_text())
    d = config.get("d_model")
    n = config.get("num_hidden_layers")
    if not isinstance(d, int) or not isinstance(n, int):
        raise MlsaeError(f"{folder / 'config.json'}: expected integer d_model and num_hidden_layers (a tuned-lens config)")
    try:
        state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle holding code, or not a tensor file at all
        raise MlsaeError(f"{folder / 'params.pt'} is not a plain tensor file ({type(e).__name__}): refusing to load it") from None
    if not isinstance(state, dict):
        raise MlsaeError(f"{folder / 'params.pt'}: expected a dictionary of tensors")
    state = {k.removeprefix("layer_translators."): v for k, v in state.items()}
    lens = TunedLens(n, d)
    with torch.no_grad():
        for block in range(n - 1):  # the last block's output has no translator
            i = block + 1
            weight, bias = state.get(f"{i}.weight"), state.get(f"{i}.bias")
            if weight is None or tuple(weight.shape) != (d, d):
                raise MlsaeError(f"{folder / 'params.pt'}: translator {i} (our block {block}) has no [{d}, {d}] weight")
            lens.weight[block].copy_(weight.float())
            if bias is not None:
                lens.bias[block].copy_(bias.float())
    return lens, {"source": "tuned-lens", "model": config.get("base_model_name_or_path"), "n_blocks": n, "d_model": d,
                  "hash": sha256(folder / "params.pt")}


def check_lens_for(lens: TunedLens, meta: dict, where: str, model_name: str, fingerprint: str, n_blocks: Optional[int]) -> None:
    """Refuse a lens (``meta`` from :func:`load_lens`) made for another model: another fingerprint
    (lenses saved here record it) or another number of blocks (when ``n_blocks`` is known)."""
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise MlsaeError(f"{where} was trained on another model ({meta.get('model')}), not {model_name}")
    if n_blocks is not None and lens.n_blocks != n_blocks:
        raise MlsaeError(f"{where} has {lens.n_blocks} blocks; the model has {n_blocks}: it belongs to another model")


# --------------------------------------------------------------------------------------------
# Training and measuring a lens


def _kl(target_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(p_target || softmax(logits)) per row."""
    logp = torch.log_softmax(logits.float(), -1)
    return (target_logp.exp() * (target_logp - logp)).sum(-1)


CHUNK_ROWS = 2048
"""Positions whose ``[rows, vocab]`` logits are held at once: memory stays bounded whatever the batch."""


def _batches(model: ResidualModel, windows: Iterable[Tensor], windows_per_batch: int, exclude_first: bool):
    """Block outputs at the positions that count, ``[N, blocks, d]``, ``windows_per_batch`` windows at a time."""
    special = special_token_ids(model.tokenizer)
    group: list[Tensor] = []

    def read(group: list[Tensor]) -> Tensor:
        ids = torch.stack(group).to(model.device)
        return model.capture(ids)[keep_mask(ids, special, exclude_first)].float()

    for w in windows:
        group.append(w)
        if len(group) == windows_per_batch:
            yield read(group)
            group = []
    if group:  # the last, shorter batch
        yield read(group)


def _chunks(model: ResidualModel, hidden: Tensor):
    """(rows of ``hidden``, the model's final log-probs there ``[rows, vocab]``), CHUNK_ROWS rows at a
    time. The final distribution is the model's read-out of the last block's output (the model's own
    logits, tested equal), so the model runs once per batch."""
    for start in range(0, len(hidden), CHUNK_ROWS):
        rows = hidden[start : start + CHUNK_ROWS]
        with torch.no_grad():
            final = torch.log_softmax(model.unembed(rows[:, -1]).float(), -1)
        yield rows, final  # outside no_grad: the caller differentiates through the lens


def _lens_logits(model: ResidualModel, lens: TunedLens, hidden: Tensor, block: int) -> Tensor:
    """The model's read-out of block ``block``'s translated vectors (``hidden: [N, blocks, d]``)."""
    return model.unembed(lens.translate(hidden[:, block : block + 1], [block])[:, 0])


def _backward(model: ResidualModel, lens: TunedLens, hidden: Tensor, kl_sum: Tensor) -> None:
    """Accumulate in the lens's gradients the gradient of the batch's KL, its mean over the rows of
    ``hidden: [N, blocks, d]`` and over the translated blocks, chunk by chunk and block by block
    (one ``[rows, vocab]`` of logits in memory); add each block's summed KL to ``kl_sum``."""
    trained = lens.n_blocks - 1
    for rows, final in _chunks(model, hidden):
        for block in range(trained):
            kl = _kl(final, _lens_logits(model, lens, rows, block)).sum()
            (kl / (len(hidden) * trained)).backward()
            kl_sum[block] += kl.item()


def train_lens(
    model: ResidualModel, windows: Iterable[Tensor], tokens: int, lr: float = 1e-3, windows_per_batch: int = 4,
    exclude_first: bool = True, progress: bool = True,
) -> tuple[TunedLens, list[float]]:
    """Train every block's translator (the last stays the identity) so that the model's final norm
    and unembedding applied to x + W_l x + b_l match the model's final next-token distribution:
    Adam on the mean over blocks of KL(p_final || p_lens), over ``tokens`` positions that count,
    one optimizer step per batch of ``windows_per_batch`` windows, the learning rate falling
    linearly to zero at ``tokens`` (the last steps average out Adam's noise).
    Returns the lens and its mean KL per block over the training tokens."""
    lens = TunedLens(model.n_layers, model.d_model).to(model.device)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    seen = 0
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: max(0.0, 1 - seen / tokens))  # linear to zero at ``tokens``
    trained = model.n_layers - 1
    kl_sum = torch.zeros(model.n_layers, dtype=torch.float64)
    with tqdm(total=tokens, unit="tok", desc="train lens", disable=not progress) as bar:
        for hidden in _batches(model, windows, windows_per_batch, exclude_first):
            hidden = hidden[: tokens - seen]
            opt.zero_grad(set_to_none=True)
            before = kl_sum.clone()
            _backward(model, lens, hidden, kl_sum)
            opt.step()
            seen += len(hidden)
            decay.step()
            batch = (kl_sum - before)[:trained] / len(hidden)  # this batch's KL per block, before its step
            bar.update(len(hidden))
            bar.set_postfix(kl=f"{float(batch.mean()):.3f}", first=f"{float(batch[0]):.3f}", last=f"{float(batch[-1]):.3f}")
            if seen >= tokens:
                break
    if seen == 0:
        raise MlsaeError("the lens's training text gave no tokens")
    return lens, (kl_sum / seen).tolist()


@torch.no_grad()
def lens_kl(
    model: ResidualModel, lens: Optional[TunedLens], windows: Iterable[Tensor], tokens: int, windows_per_batch: int = 4,
    exclude_first: bool = True,
) -> tuple[list[float], list[float]]:
    """Mean KL(p_final || p) per block on held-out windows, for the logit lens (the model's final
    norm and unembedding on the raw residual) and the tuned lens (None: logit lens only)."""
    logit = torch.zeros(model.n_layers, dtype=torch.float64)
    tuned = torch.zeros(model.n_layers, dtype=torch.float64)
    seen = 0
    for hidden in _batches(model, windows, windows_per_batch, exclude_first):
        hidden = hidden[: tokens - seen]
        for rows, final in _chunks(model, hidden):
            for block in range(model.n_layers):
                logit[block] += float(_kl(final, model.unembed(rows[:, block])).sum())
                if lens is not None:
                    tuned[block] += float(_kl(final, _lens_logits(model, lens, rows, block)).sum())
        seen += len(hidden)
        if seen >= tokens:
            break
    if seen == 0:
        raise MlsaeError("the held-out text gave no tokens")
    return (logit / seen).tolist(), (tuned / seen).tolist()


# --------------------------------------------------------------------------------------------
# The ``mlsae lens`` command


def run_lens_command(cfg) -> None:
    """``mlsae lens train``: fit and save a lens; ``mlsae lens eval``: KL per layer, logit lens against it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .model import load_model
    from .text import check_source, data_windows

    out = Path(cfg.out)
    if cfg.layers is not None:
        raise MlsaeError("--layers: a lens has a translator for every block; leave --layers out")
    if cfg.action == "train" and (out / "lens.json").exists() and not cfg.overwrite:
        raise MlsaeError(f"{out} already holds a lens; pass --overwrite to replace it")
    if cfg.action == "eval" and not (out / "lens.json").is_file():
        raise MlsaeError(f"{out} holds no lens trained here (lens.json): train one with `mlsae lens train --out {out}`")
    check_source(cfg.data)
    model = load_model(cfg.model, cfg.model_dtype, cfg.device)
    windows = data_windows(cfg, model.tokenizer)
    if cfg.action == "train":
        started = time.perf_counter()
        lens, kl = train_lens(model, windows, cfg.tokens, cfg.lr, cfg.windows_per_batch, cfg.exclude_first_position)
        digest = lens.save(out, model.name, model.fingerprint())
        save_json(out / "train.json", {"tokens": cfg.tokens, "lr": cfg.lr, "data": cfg.data, "ctx": cfg.ctx,
                                       "windows_per_batch": cfg.windows_per_batch, "kl_per_block": kl,
                                       "seconds": round(time.perf_counter() - started, 1)})
        print(f"lens trained on {cfg.tokens:,} tokens: mean KL {sum(kl[:-1]) / max(len(kl) - 1, 1):.4f} over the translated "
              f"blocks; saved in {out} (sha256 {digest[:12]})")
        return
    lens, meta = load_lens(out)
    check_lens_for(lens, meta, f"the lens in {out}", model.name, model.fingerprint(), model.n_layers)
    if lens.d_model != model.d_model:
        raise MlsaeError(f"the lens in {out} reads vectors of {lens.d_model}, the model's are {model.d_model}: it belongs to another model")
    logit, tuned = lens_kl(model, lens.to(model.device), windows, cfg.tokens, cfg.windows_per_batch, cfg.exclude_first_position)
    table = pa.table({"layer": list(range(model.n_layers)), "kl_logit_lens": logit, "kl_tuned_lens": tuned})
    pq.write_table(table, out / "kl.parquet")
    for layer, a, b in zip(range(model.n_layers), logit, tuned):
        print(f"layer {layer:3d}  KL logit lens {a:8.4f}  tuned lens {b:8.4f}")
    print(f"written to {out / 'kl.parquet'}")
