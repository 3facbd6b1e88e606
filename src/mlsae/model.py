"""Load a causal LM and read its residual stream: the output of every transformer block.

The residual stream at layer l is the output of block l (after its residual add). Hugging Face's
``output_hidden_states`` gives the last block's output AFTER the final norm for most
architectures, so the blocks are hooked directly instead (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import MlsaeError

# Model class -> (attribute path of the block list, attribute path of the final norm).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "GPTNeoXForCausalLM": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "GPT2LMHeadModel": ("transformer.h", "transformer.ln_f"),
    "LlamaForCausalLM": ("model.layers", "model.norm"),
    "GemmaForCausalLM": ("model.layers", "model.norm"),
    "Gemma2ForCausalLM": ("model.layers", "model.norm"),
    "Gemma3ForCausalLM": ("model.layers", "model.norm"),
    "Qwen2ForCausalLM": ("model.layers", "model.norm"),
    "Qwen3ForCausalLM": ("model.layers", "model.norm"),
    "MistralForCausalLM": ("model.layers", "model.norm"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise MlsaeError(f"{what} {name!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise MlsaeError(f"device {name!r} is not a torch device ({e})") from None


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _StopForward(Exception):
    """Raised by a hook after the last block we need, to skip the rest of the forward pass."""


def _hidden(output) -> Tensor:
    """Blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class ResidualModel:
    """A causal LM with access to its blocks' outputs."""

    model: nn.Module
    tokenizer: object
    name: str

    def __post_init__(self) -> None:
        cls = type(self.model).__name__
        if cls not in ARCHITECTURES:
            raise MlsaeError(
                f"model class {cls} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        blocks_path, norm_path = ARCHITECTURES[cls]
        self.blocks: nn.ModuleList = _get(self.model, blocks_path)  # type: ignore[assignment]
        self.final_norm: nn.Module = _get(self.model, norm_path)
        self.model.eval()
        self.model.requires_grad_(False)
        self._block_output_tuple = self._blocks_return_tuples()

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layers(self, layers: Optional[Sequence[int]]) -> list[int]:
        """Validate a layer selection (None means every block) and return it sorted."""
        if layers is None:
            return list(range(self.n_layers))
        out = sorted(set(int(i) for i in layers))
        if not out:
            raise MlsaeError("layers: expected at least one layer index")
        bad = [i for i in out if not 0 <= i < self.n_layers]
        if bad:
            raise MlsaeError(
                f"layer {bad[0]} is out of range; {self.name} has {self.n_layers} blocks (0..{self.n_layers - 1})"
            )
        return out

    def fingerprint(self) -> str:
        """A short hash of the architecture and a slice of the embedding weights.

        Saved with caches and checkpoints so that one written for another model is refused.
        """
        emb = self.model.get_input_embeddings().weight
        h = hashlib.sha256()
        h.update(f"{type(self.model).__name__}/{self.n_layers}/{self.d_model}/{emb.shape[0]}".encode())
        h.update(emb[:8].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def capture(
        self, input_ids: Tensor, layers: Optional[Sequence[int]] = None, attention_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Block outputs for ``input_ids: [batch, pos]`` -> ``[batch, pos, len(layers), d_model]``.

        The forward pass stops after the last requested block.
        """
        return self._capture(input_ids, layers, attention_mask)

    def residuals_from(self, layer: int, residual: Tensor, input_ids: Tensor, layers: Sequence[int]) -> Tensor:
        """Outputs of blocks ``layers`` (each after ``layer``) when block ``layer``'s output is
        ``residual: [batch, pos, d]``: the model's own map from layer l to the later layers,
        ``[batch, pos, len(layers), d]``. Differentiable, forward mode included (not no_grad)."""
        (layer,) = self.check_layers([layer])
        layers = self.check_layers(layers)
        if layers[0] <= layer:
            raise MlsaeError(f"layers {layers}: expected layers after {layer}")
        with self._skip_blocks_until(layer, residual):
            return self._capture(input_ids, layers)

    def _capture(self, input_ids: Tensor, layers: Optional[Sequence[int]], attention_mask: Optional[Tensor] = None) -> Tensor:
        layers = self.check_layers(layers)
        outputs: dict[int, Tensor] = {}
        last = layers[-1]

        def hook(index: int):
            def fn(_module, _args, output):
                outputs[index] = _hidden(output)
                if index == last:
                    raise _StopForward

            return fn

        handles = [self.blocks[i].register_forward_hook(hook(i)) for i in layers]
        try:
            self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([outputs[i] for i in layers], dim=2)

    @torch.no_grad()
    def logits(self, input_ids: Tensor) -> Tensor:
        """Next-token logits ``[batch, pos, vocab]`` of the unmodified model."""
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def unembed(self, h: Tensor) -> Tensor:
        """Logits the model's own final norm and unembedding give for residual vectors ``h: [..., d]``
        (the logit lens; differentiable in h, for training a tuned lens)."""
        logits = self.model.get_output_embeddings()(self.final_norm(h))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    @torch.no_grad()
    def logits_from(self, layer: int, residual: Tensor, input_ids: Tensor) -> Tensor:
        """Logits when the output of block ``layer`` is replaced by ``residual: [batch, pos, d]``.

        Blocks 0..layer are skipped rather than recomputed (only the embeddings, position
        encodings and masks are built), so splicing costs the remaining blocks alone.
        """
        (layer,) = self.check_layers([layer])
        with self._skip_blocks_until(layer, residual):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def _blocks_return_tuples(self) -> bool:
        """Whether this transformers version's blocks return (hidden, ...) or the tensor alone:
        a skipped block must answer in the same form. Found once, at load, from one token."""
        seen = []
        handle = self.blocks[0].register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
        try:
            self.capture(torch.ones(1, 1, dtype=torch.long), [0])
        finally:
            handle.remove()
        return seen[0]

    @contextlib.contextmanager
    def _skip_blocks_until(self, layer: int, residual: Tensor) -> Iterator[None]:
        wrap = (lambda h: (h,)) if self._block_output_tuple else (lambda h: h)

        def passthrough(hidden_states, *args, **kwargs):
            return wrap(hidden_states)

        def inject(hidden_states, *args, **kwargs):
            return wrap(residual.to(hidden_states.dtype))

        # Instance attributes shadow the class's forward; block attributes the model's loop reads
        # (such as a Gemma block's attention type) are left untouched.
        for i in range(layer):
            self.blocks[i].forward = passthrough
        self.blocks[layer].forward = inject
        try:
            yield
        finally:
            for i in range(layer + 1):
                del self.blocks[i].forward


def special_token_ids(tokenizer) -> set[int]:
    """BOS, EOS and PAD ids: positions holding them are excluded from training and metrics."""
    ids = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {int(i) for i in ids if i is not None}


def resolve_model_spec(spec: str) -> tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name or None) for a model spec."""
    if spec == "smollm2":
        from .assets import smollm2_gguf

        path = smollm2_gguf()
        return str(path.parent), path.name
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MlsaeError(f"model file {spec} does not exist (expected a .gguf file)")
        return str(p.parent), p.name
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and len(ggufs) == 1:
            return str(p), ggufs[0].name
        if not (p / "config.json").is_file():
            raise MlsaeError(f"model folder {spec} has no config.json (expected a saved Hugging Face model)")
        return str(p), None
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise MlsaeError(f"model {spec} is not a folder, a .gguf file or a hub id")
    return spec, None


def _dtype_argument() -> str:
    """from_pretrained's precision argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _source(spec: str) -> tuple[str, dict]:
    """Where ``from_pretrained`` reads ``spec``: the folder or hub id, and ``gguf_file`` when it is one."""
    path, gguf_file = resolve_model_spec(spec)
    if gguf_file is None:
        return path, {}
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MlsaeError(f"model {spec} is a GGUF file, which needs the 'gguf' package: pip install gguf") from None
    return path, {"gguf_file": gguf_file}


@contextlib.contextmanager
def _loading(spec: str) -> Iterator[None]:
    """A loader's error as one line naming the model."""
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlsaeError(f"could not load model {spec}: {first}") from None


def load_tokenizer(spec: str):
    """The tokenizer of a model spec alone (decoding stored token ids needs no weights)."""
    import transformers

    path, kwargs = _source(spec)
    with _loading(spec):
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def load_model(spec: str, dtype: str = "float32", device: str = "auto", tokenizer=None) -> ResidualModel:
    """Load a causal LM and its tokenizer from a hub id, a local folder or a .gguf file
    (``tokenizer``: one already loaded from the same spec, not read again)."""
    import transformers

    path, kwargs = _source(spec)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    with _loading(spec):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **{_dtype_argument(): parse_dtype(dtype, "model dtype")}, **kwargs)
    model.to(resolve_device(device))
    return ResidualModel(model, tokenizer, spec)
