"""Every setting of the project, as dataclasses with one docstring line per field.

The command line and each run's saved ``config.json`` are generated from these classes and
nowhere else: the docstring under a field is its ``--help`` text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class ModelConfig:
    model: str = "smollm2"
    """Causal LM: a hub id, a local folder, a .gguf file, or 'smollm2' for the offline SmolLM2-135M."""
    layers: Optional[list[int]] = None
    """Block indices whose outputs are captured (default: every block)."""
    model_dtype: str = "float32"
    """Precision the language model runs in: float32, bfloat16 or float16."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, or auto (cuda when available)."""


@dataclass
class DataConfig:
    data: str = "builtin:pydocs"
    """Text: a .txt/.jsonl/.parquet file or folder, a hub dataset id, or builtin:pydocs (offline)."""
    split: str = "train"
    """Dataset split, for hub datasets."""
    text_field: str = "text"
    """Name of the text column in .jsonl, .parquet and hub datasets."""
    ctx: int = 2048
    """Tokens per context window."""
    prepend_bos: str = "auto"
    """Start each window with BOS: auto (when the tokenizer adds one), always or never."""
    exclude_first_position: bool = True
    """Leave the first position of every window out of training and metrics (attention sink)."""
    windows_per_batch: int = 8
    """Context windows sent through the language model at once."""


@dataclass
class CacheConfig(ModelConfig, DataConfig):
    tokens: int = 1_000_000
    """Number of (non-excluded) token positions to capture."""
    out: str = "activations"
    """Folder the cache is written to."""
    dtype: str = "float32"
    """Storage precision of the cached activations: float32, float16 or bfloat16."""
    shard_tokens: int = 65_536
    """Token positions per shard file."""
    overwrite: bool = False
    """Replace an existing cache in the output folder."""


@dataclass
class SAEConfig:
    arch: str = "mlsae"
    """Arrangement of the sparse coder: mlsae (one dictionary for all layers), per-layer (one per layer) or concat (one dictionary over the concatenated layers)."""
    expansion_factor: int = 64
    """Latents per input dimension of the coder: d_model for mlsae and per-layer, d_model x layers for concat (ignored when --n-latents is given)."""
    n_latents: Optional[int] = None
    """Number of latents (per dictionary), overriding --expansion-factor: use it to compare arrangements at equal latents."""
    k: int = 32
    """Active latents per example (TopK)."""
    k_aux: Optional[int] = None
    """Dead latents used by the AuxK loss (default: the power of 2 nearest d/2)."""
    aux_coef: float = 1 / 32
    """Weight alpha of the AuxK loss (0 switches AuxK off)."""
    auxk_norm: str = "input"
    """What the AuxK error is divided by, per layer: input (the input's variance, like FVU) or error (the error's own variance, as Gao et al.)."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired at any layer within this many tokens."""
    standardize: bool = True
    """Standardise each input vector to zero mean and unit variance before encoding."""
    center_layers: bool = True
    """Subtract each layer's mean (fitted on the first batches after standardising, then frozen) before the encoder; add it back after the decoder."""
    b_pre_init: str = "geometric_median"
    """Where b_pre starts, in the space the coder sees: geometric_median or mean of the first batches, or zero."""
    loss_space: str = "standardized"
    """Which FVU training minimises: standardized (the coder's input, after the transforms above) or raw."""
    decoder_impl: str = "auto"
    """Sparse decode and encoder backward: auto (triton on a GPU when installed, else sparse; MLSAE_KERNELS overrides), sparse (k rows per example, gathers), triton (GPU kernels) or dense."""
    lens: Optional[str] = None
    """A tuned lens folder (`mlsae lens train`, or the tuned-lens package's layout): each layer's vector is translated before the encoder and the output mapped back (Lawson et al. eqs. 8-9)."""
    post_bias: bool = False
    """Add a learned per-latent bias to the active latents after TopK (Baskaran & Sklar's experiment)."""
    init_gain: float = 1.0
    """concat only: scale the initial encoder so the first batch's reconstruction has c x the input's standard deviation (c in c*sqrt(Var(x)/Var(x_hat)))."""


@dataclass
class TrainConfig(ModelConfig, DataConfig, SAEConfig):
    cache: Optional[str] = None
    """Read activations from this cache folder instead of running the model."""
    tokens: int = 1_000_000_000
    """Training tokens (each gives one example per layer)."""
    tokens_per_step: int = 131_072
    """Tokens per optimizer step (gradient accumulation over micro-batches)."""
    init_tokens: int = 4096
    """Tokens read before the first step to fit the layer means and start b_pre (then trained on as usual)."""
    micro_batch_tokens: int = 4096
    """Tokens per forward/backward pass of the sparse coder."""
    coder_dtype: str = "float32"
    """Precision of the coder's matmuls in training: float32, or bfloat16 (autocast: weights, gradients, Adam and the losses stay float32; for GPUs with fast bf16)."""
    lr: float = 1e-4
    """Adam learning rate."""
    adam_eps: float = 6.25e-10
    """Adam epsilon."""
    seed: int = 0
    """Random seed for initialisation and shuffling."""
    checkpoint_tokens: int = 10_000_000
    """Write a checkpoint every this many tokens."""
    shuffle_buffer_mb: int = 512
    """Memory for shuffling cached activations, in MB."""
    prefetch: str = "auto"
    """Read the next micro-batches in a background thread while the coder trains: on, off, or auto (on when the model runs on a GPU)."""
    verify_cache: bool = True
    """Check the cache's checksums before training (one read of the whole cache)."""
    distribute_layers: bool = False
    """Under torchrun, per-layer coders only: each process holds the SAEs of its share of the layers, and the activations are exchanged instead of the weights replicated."""
    shard_latents: bool = False
    """Under torchrun: each process holds a slice of every dictionary's latents, and the top k is merged across them (the same codes as one process), for dictionaries too large for one device."""
    out: str = "runs/mlsae"
    """Run folder: config.json, checkpoints, metrics.jsonl."""
    resume: bool = False
    """Continue the run in the output folder from its last checkpoint."""
    overwrite: bool = False
    """Replace a different run already in the output folder."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package)."""


@dataclass
class SweepConfig(TrainConfig):
    """``mlsae sweep``: the settings of ``mlsae train``, four of them taking several values; one
    run is trained for every combination, all from one activation stream."""

    arch: list[str] = dataclasses.field(default_factory=lambda: ["mlsae"])
    """Arrangements to train (mlsae, per-layer, concat), one run each per combination."""
    expansion_factor: list[int] = dataclasses.field(default_factory=lambda: [64])
    """Expansion factors to train (latents per input dimension of the coder)."""
    k: list[int] = dataclasses.field(default_factory=lambda: [32])
    """Active latents per example (TopK) to train."""
    lr: list[float] = dataclasses.field(default_factory=lambda: [1e-4])
    """Adam learning rates to train."""
    out: str = "runs/sweep"
    """Folder of the sweep: one run folder per combination inside it, and sweep.json."""

    SWEPT = ("arch", "expansion_factor", "k", "lr")


@dataclass
class HeldOutConfig:
    run: str = ""
    """Run folder of a trained sparse coder."""
    data: Optional[str] = None
    """Held-out text (file, folder, hub dataset id or builtin:pydocs) or an activation cache folder."""
    split: str = "test"
    """Dataset split, for hub datasets and builtin:pydocs."""
    tokens: int = 20_000
    """Held-out tokens to read (for eval: the reconstruction metrics)."""
    ctx: Optional[int] = None
    """Context length (default: the run's)."""
    out: Optional[str] = None
    """Folder for the results (default: inside the run folder)."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, or auto."""
    batch_tokens: int = 4096
    """Tokens per batch through the model and the coder."""
    allow_unfinished: bool = False
    """Use an unfinished run's latest checkpoint (with a warning) instead of refusing it."""


@dataclass
class EvalConfig(HeldOutConfig):
    downstream_tokens: Optional[int] = None
    """Tokens for the downstream metrics (delta CE, KL, ablations); 0 skips them (default: the smaller of 4,000 and --tokens)."""
    ablations: bool = True
    """Also measure zero- and mean-ablation and loss recovered (triples the downstream cost, once: see --reuse-ablations)."""
    reuse_ablations: bool = True
    """Reuse zero- and mean-ablation losses measured before on the same model, text, layers and layer means (they do not depend on the coder; stored under $MLSAE_CACHE_DIR/ablations); --no-reuse-ablations measures them again."""
    paper_definitions: bool = False
    """Also report delta CE and KL as the paper's code defines them (every position spliced and scored: columns ending in _paper)."""
    layers: Optional[list[int]] = None
    """Evaluate only these layers (default: every layer of the run)."""
    compare: Optional[list[str]] = None
    """Other run folders to evaluate on the same text and show side by side."""


@dataclass
class JointAnalysisConfig:
    """The analyses of a concat run (Baskaran & Sklar): decoder cosines and information flow."""

    cosine_latents: int = 100
    """concat: decoder cosines between layers are averaged over this many most active latents (overall and per trigger bucket)."""
    flow_latents_per_bucket: int = 16
    """concat: information flow is averaged per trigger bucket over this many of its most active latents (0 skips it)."""
    flow_tokens: int = 8
    """concat: firing tokens per latent at which the flow is measured (its largest activations)."""
    flow_windows: int = 128
    """concat: held-out windows searched for those tokens."""
    flow_positions: int = 64
    """concat: positions of each window searched (the flow runs the model on the prefix up to the token)."""
    flow_max_k: Optional[int] = None
    """concat: the largest gap k, in captured layers, from layer l to l+k (default: every later layer)."""
    flow_text: Optional[str] = None
    """concat: a text on which the flow of --flow-latent is measured token by token."""
    flow_latent: Optional[list[int]] = None
    """concat: latents whose flow is measured at every token of --flow-text where they fire."""


@dataclass
class AnalyzeConfig(HeldOutConfig, JointAnalysisConfig):
    prompt: Optional[list[str]] = None
    """Texts to draw latents x layers heatmaps for."""
    top_n: int = 10
    """Max-activating examples kept per latent and layer."""


@dataclass
class ReportConfig:
    run: str = ""
    """Run folder (evaluated with `mlsae eval` and analysed with `mlsae analyze`)."""
    out: Optional[str] = None
    """Folder for index.html and its figures (default: RUN/report)."""
    compare: Optional[list[str]] = None
    """Other analysed runs shown beside this one (how many layers latents span, for every arrangement)."""


@dataclass
class LensConfig(ModelConfig, DataConfig):
    action: str = "train"
    """train: fit a tuned lens on --data and save it in --out; eval: the KL per layer of the logit lens and the lens in --out on --data."""
    tokens: int = 200_000
    """Positions that count read (train: training tokens; eval: held-out tokens)."""
    lr: float = 1e-3
    """Adam learning rate of the translators."""
    out: str = "lens"
    """Folder of the lens (lens.safetensors, lens.json; eval writes kl.parquet beside them)."""
    overwrite: bool = False
    """Replace a lens already in --out."""


@dataclass
class ExportConfig:
    run: str = ""
    """Run folder of a trained coder."""
    format: str = "sparsify"
    """Library format: sparsify (folders layers.{l}) or saelens (folders blocks.{l}.hook_resid_post)."""
    out: str = "export"
    """Folder for the per-layer SAE folders."""
    overwrite: bool = False
    """Replace an existing, non-empty export folder."""


@dataclass
class ImportConfig:
    source: str = ""
    """Folder of per-layer SAEs saved by sparsify or SAELens (or one SAE folder)."""
    model: str = "smollm2"
    """The causal LM the SAEs were trained on (a hub id, a local folder, a .gguf file, or smollm2)."""
    format: str = "auto"
    """Format of the source: auto (from the files), sparsify or saelens."""
    out: str = "runs/imported"
    """Run folder to write (a per-layer run that eval, analyze and report read)."""
    ctx: int = 2048
    """Context length eval and analyze pack held-out text to by default."""
    overwrite: bool = False
    """Replace a run already in the output folder."""


@dataclass
class PushConfig:
    run: str = ""
    """Run folder of a finished coder."""
    repo_id: str = ""
    """Hub repo to create or update, as user-or-org/name (the token comes from HF_TOKEN or `hf auth login`)."""
    private: bool = False
    """Create the repo private."""


@dataclass
class ServeConfig:
    runs: list[str] = dataclasses.field(default_factory=list)
    """Run folders to explore (finished runs; analyse them first for the latent pages)."""
    host: str = "127.0.0.1"
    """Address to listen on: loopback by default (there is no login: another address lets others read the runs)."""
    port: int = 8000
    """Port to listen on."""
    device: str = "cpu"
    """Torch device for the live model and coder (prompts): cpu, cuda, cuda:N or auto."""


@dataclass
class DemoConfig:
    out: str = "mlsae-demo"
    """Folder for the demo's run, evaluation, analysis and report."""
    tokens: int = 40_000
    """Training tokens (the demo finishes in about 10 minutes on 2 CPU cores)."""
    eval_tokens: int = 5_000
    """Held-out tokens for the reconstruction metrics and the analyses."""
    downstream_tokens: int = 1_000
    """Held-out tokens for delta CE and KL."""
    device: str = "auto"
    """Torch device: cpu, cuda, cuda:N, or auto."""


# --------------------------------------------------------------------------------------------
# One check of every command's settings before any work: a bad value is one clear line.

MINIMUM = {
    "tokens": 1, "tokens_per_step": 1, "micro_batch_tokens": 1, "init_tokens": 1, "checkpoint_tokens": 1,
    "shuffle_buffer_mb": 1, "dead_tokens": 1, "expansion_factor": 1, "n_latents": 1, "k": 1, "cosine_latents": 1,
    "flow_latents_per_bucket": 0, "flow_tokens": 1, "flow_windows": 1, "flow_positions": 2, "flow_max_k": 1, "flow_latent": 0, "k_aux": 1, "ctx": 2,
    "windows_per_batch": 1, "shard_tokens": 1, "batch_tokens": 1, "top_n": 1, "eval_tokens": 1,
    "downstream_tokens": 0, "layers": 0, "port": 1,
}
"""The smallest value each integer setting (or each item of a list of them) may take."""
POSITIVE_FLOATS = ("lr", "adam_eps", "init_gain")
NON_NEGATIVE_FLOATS = ("aux_coef",)
CHOICES = {
    "arch": ("mlsae", "per-layer", "concat"),
    "loss_space": ("standardized", "raw"),
    "b_pre_init": ("geometric_median", "mean", "zero"),
    "auxk_norm": ("input", "error"),
    "decoder_impl": ("auto", "sparse", "dense", "triton"),
    "model_dtype": ("float32", "bfloat16", "float16"),
    "coder_dtype": ("float32", "bfloat16"),
    "dtype": ("float32", "bfloat16", "float16"),
    "prepend_bos": ("auto", "always", "never"),
    "action": ("train", "eval"),
    "prefetch": ("auto", "on", "off"),
}
"""The values each string setting may take (the arrangement registry and kernels check the same)."""


def _flag(name: str) -> str:
    return name if name in POSITIONAL else "--" + name.replace("_", "-")


def validate(cfg) -> None:
    """Refuse a setting outside its range before any work starts, naming the flag and what it takes."""
    from .errors import MlsaeError

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]  # a list setting (layers, a sweep's values) item by item
        if f.name in MINIMUM:
            low = MINIMUM[f.name]
            bad = [v for v in items if not isinstance(v, int) or isinstance(v, bool) or v < low]
            if bad:
                raise MlsaeError(f"{_flag(f.name)} {bad[0]!r}: expected a whole number >= {low}")
        for v in items if f.name in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS else ():
            ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or (v == 0 and f.name in NON_NEGATIVE_FLOATS))
            if not ok:
                kind = "positive" if f.name in POSITIVE_FLOATS else "non-negative"
                raise MlsaeError(f"{_flag(f.name)} {v!r}: expected a finite {kind} number")
        for v in items if f.name in CHOICES else ():
            if v not in CHOICES[f.name]:
                raise MlsaeError(f"{_flag(f.name)} {v!r}: expected one of {', '.join(CHOICES[f.name])}")
        if f.name == "device" and not (value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())):
            raise MlsaeError(f"--device {value!r}: expected cpu, cuda, cuda:N, mps or auto")
        if f.name == "run" and not value:
            raise MlsaeError("RUN: expected the folder of a trained run")
        if f.name == "port" and value > 65535:
            raise MlsaeError(f"--port {value}: expected a port number from 1 to 65535")
    n_latents, k = getattr(cfg, "n_latents", None), getattr(cfg, "k", None)
    k = max(k) if isinstance(k, list) else k
    if n_latents is not None and k is not None and k > n_latents:
        raise MlsaeError(f"--k {k} is larger than --n-latents {n_latents}: expected k <= n_latents")


POSITIONAL = {"run", "runs", "action", "source"}
"""Fields given as positional arguments on the command line."""

# --------------------------------------------------------------------------------------------
# Field docstrings, command-line generation and config.json


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of ``cls`` and its bases, read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field, typed from its annotation, helped by its docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name in POSITIONAL:
            many = {"nargs": "+"} if typing.get_origin(tp) is list else {}
            parser.add_argument(f.name, metavar=f.name.upper(), help=docs.get(f.name, ""), **many)
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["-" + f.name] if len(f.name) == 1 else [])
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parser.add_argument(*flags, type=item, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(*flags, type=tp, default=default, help=help_text, metavar=f.name.upper())


def from_namespace(cls: type, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict):
    """Build ``cls`` from a saved dict, ignoring keys that belong to other settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def save_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def subset(cfg, cls: type):
    """The fields of ``cfg`` that belong to ``cls`` (e.g. the ModelConfig part of a TrainConfig)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


__all__ = [
    "ModelConfig",
    "DataConfig",
    "CacheConfig",
    "SAEConfig",
    "TrainConfig",
    "SweepConfig",
    "HeldOutConfig",
    "EvalConfig",
    "AnalyzeConfig",
    "JointAnalysisConfig",
    "ReportConfig",
    "DemoConfig",
    "LensConfig",
    "add_arguments",
    "validate",
    "from_namespace",
    "from_dict",
    "to_dict",
    "save_json",
    "subset",
    "field_docs",
]
