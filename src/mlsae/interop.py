"""Our coders in other libraries' per-layer SAE formats, and theirs as our runs.

Both libraries hold one plain TopK SAE per hook point, in the model's own units:
    h = TopK(W_enc (x - b_dec) + b_enc),   x_hat = W_dec^T h + b_dec
(sparsify takes the ReLU before the TopK, we after: the same codes). A coder of ours becomes
one such SAE per layer (:func:`layer_saes`) when its input transforms are affine per layer:
the per-layer centring and a tuned lens, x_in = A_l x + t_l, fold exactly into the weights:
    W_enc' = W_enc A_l,  b_enc' = b_enc,  W_dec' = W_dec A_l^-T,  b_dec' = A_l^-1 (b_pre - t_l).
The per-vector standardisation divides each vector by its own standard deviation, which no
per-layer linear map can do, so a coder trained with it is refused with what would be lost
(neither library's normalisations is ours exactly), as is a concat coder, whose one code spans
every layer, and a post-activation bias.

On disk (one folder per layer, named as each library names the hook point):
- sparsify: ``layers.{l}/cfg.json`` + ``sae.safetensors`` (encoder.weight [n, d], encoder.bias,
  W_dec [n, d], b_dec);
- SAELens: ``blocks.{l}.hook_resid_post/cfg.json`` + ``sae_weights.safetensors`` (W_enc [d, n],
  b_enc, W_dec [n, d], b_dec), architecture ``topk``, no activation normalisation.
Our layer l is the output of block l (the last one before the final norm), which is both
libraries' hook point of that name.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import __version__
from .config import SAEConfig, save_json
from .errors import MlsaeError
from .runs import RunSpec, open_run
from .sae import ARRANGEMENTS, SparseCoder, save_coder

FORMATS = ("saelens", "sparsify")
SAELENS_FORMAT = "6.0.0"
"""The SAELens config layout written (its version 6 layout: the hook and model under ``metadata``)."""


@dataclass
class LayerSAE:
    """One plain TopK SAE at one layer, in the model's units (see the module docstring)."""

    layer: int
    W_enc: Tensor  # [n, d]
    b_enc: Tensor  # [n]
    W_dec: Tensor  # [n, d]
    b_dec: Tensor  # [d]
    k: int

    def reconstruct(self, x: Tensor) -> Tensor:
        """x_hat of ``x: [N, d]`` (the formula both libraries apply)."""
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        h = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return h @ self.W_dec + self.b_dec


def _cannot_export(coder: SparseCoder, fmt: str) -> Optional[str]:
    """Why ``coder`` has no exact per-layer form in ``fmt``, or None."""
    if coder.latent_space == "joint":
        return (f"a {coder.arch} coder has ONE code per token spanning all {len(coder.layers)} layers; {fmt} holds one SAE per "
                f"layer, so the joint code (and what it says about how layers share latents) would be lost")
    if coder.cfg.standardize:
        return (f"the coder standardises each vector by its own mean and standard deviation before encoding; {fmt} applies "
                f"{'no such normalisation' if fmt == 'sparsify' else 'its layer_norm with the unbiased deviation plus 1e-5, not ours'}, "
                f"so every reconstruction would change (train with --no-standardize to export)")
    if coder.cfg.post_bias:
        return f"the coder adds a learned bias to the active latents after the TopK, which {fmt} cannot hold"
    return None


@torch.no_grad()
def layer_saes(coder: SparseCoder, fmt: str = "a per-layer format") -> list[LayerSAE]:
    """``coder`` as one plain TopK SAE per layer in the model's units, its affine input transforms
    folded into the weights; refuses a coder without an exact form (naming what would be lost)."""
    why = _cannot_export(coder, fmt)
    if why:
        raise MlsaeError(f"cannot export to {fmt}: {why}")
    coder = coder.cpu().double()
    L, d = len(coder.layers), coder.d_model
    probe = torch.zeros(d + 1, L, d, dtype=torch.float64)
    probe[1:] = torch.eye(d, dtype=torch.float64)[:, None, :]
    y, _ = coder.transform(probe)
    t = y[0]  # [L, d]: where zero goes
    out = []
    dicts = coder.dictionaries()
    for i, layer in enumerate(coder.layers):
        A = (y[1:, i] - t[i]).T  # x_in = A x + t at this layer
        A_inv = torch.linalg.inv(A)
        D = dicts[i if len(dicts) > 1 else 0]
        out.append(LayerSAE(
            layer=layer,
            W_enc=(D.W_enc @ A).float(),
            b_enc=D.b_enc.detach().clone().float(),
            W_dec=(D.W_dec @ A_inv.T).float(),
            b_dec=(A_inv @ (D.b_pre - t[i])).float(),
            k=D.k,
        ))
    coder.float()
    return out


# --------------------------------------------------------------------------------------------
# Export


def _sparsify_folder(sae: LayerSAE, folder: Path) -> None:
    folder.mkdir(parents=True)
    n, d = sae.W_enc.shape
    save_file({"encoder.weight": sae.W_enc.contiguous(), "encoder.bias": sae.b_enc.contiguous(),
               "W_dec": sae.W_dec.contiguous(), "b_dec": sae.b_dec.contiguous()}, str(folder / "sae.safetensors"))
    save_json(folder / "cfg.json", {"activation": "topk", "expansion_factor": max(1, n // d), "normalize_decoder": True,
                                    "num_latents": n, "k": sae.k, "multi_topk": False, "skip_connection": False,
                                    "transcode": False, "d_in": d})


def _saelens_folder(sae: LayerSAE, folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True)
    n, d = sae.W_enc.shape
    save_file({"W_enc": sae.W_enc.T.contiguous(), "b_enc": sae.b_enc.contiguous(), "W_dec": sae.W_dec.contiguous(),
               "b_dec": sae.b_dec.contiguous()}, str(folder / "sae_weights.safetensors"))
    train = meta.get("train", {})
    save_json(folder / "cfg.json", {
        "architecture": "topk", "d_in": d, "d_sae": n, "k": sae.k, "rescale_acts_by_decoder_norm": False,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": meta.get("model"), "hook_name": f"blocks.{sae.layer}.hook_resid_post",
                     "context_size": train.get("ctx"), "dataset_path": train.get("data"),
                     "prepend_bos": train.get("prepend_bos") != "never",
                     "sae_lens_version": SAELENS_FORMAT},
    })


def hook_folder(fmt: str, layer: int) -> str:
    """The folder (hook point) of ``layer`` in ``fmt``'s naming."""
    return f"layers.{layer}" if fmt == "sparsify" else f"blocks.{layer}.hook_resid_post"


def export_run(run: str | Path, fmt: str, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``run``'s coder as one ``fmt`` SAE folder per layer in ``out``; the folders written."""
    if fmt not in FORMATS:
        raise MlsaeError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    _check_out(Path(out), overwrite)  # before the run is loaded
    return write_export(open_run(run), fmt, out, overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MlsaeError(f"export folder {out} already exists and is not empty; pass --overwrite to replace it")


def write_export(spec: RunSpec, fmt: str, out: str | Path, overwrite: bool = False) -> list[Path]:
    """:func:`export_run` for a run already open (``runs.open_run``)."""
    out = Path(out)
    _check_out(out, overwrite)
    run = spec.folder
    saes = layer_saes(spec.coder, fmt)  # refused before anything is written
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    folders = []
    for sae in saes:
        folder = out / hook_folder(fmt, sae.layer)
        _sparsify_folder(sae, folder) if fmt == "sparsify" else _saelens_folder(sae, folder, spec.meta)
        folders.append(folder)
    save_json(out / "mlsae_export.json", {"mlsae_version": __version__, "format": fmt, "run": str(run), "model": spec.meta["model"],
                                          "arch": spec.meta["sae"]["arch"], "layers": spec.meta["layers"]})
    return folders


# --------------------------------------------------------------------------------------------
# Import


def _read_sparsify(folder: Path) -> tuple[Optional[int], dict]:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, want in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if cfg.get(key, want) != want:
            raise MlsaeError(f"{folder}: a sparsify coder with {key}={cfg[key]!r} is not a plain TopK SAE (expected {want!r})")
    w = load_file(str(folder / "sae.safetensors"))
    if "W_dec" not in w:
        raise MlsaeError(f"{folder}: the sparsify coder was saved without its decoder")
    m = re.fullmatch(r"layers\.(\d+)", folder.name)
    return (int(m[1]) if m else None), dict(W_enc=w["encoder.weight"], b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
                                            k=int(cfg["k"]))


def _read_saelens(folder: Path) -> tuple[Optional[int], dict]:
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("architecture", "topk") != "topk":
        raise MlsaeError(f"{folder}: a SAELens {cfg['architecture']!r} SAE is not a TopK SAE (expected architecture 'topk')")
    for key, want in (("normalize_activations", "none"), ("rescale_acts_by_decoder_norm", False), ("reshape_activations", "none")):
        if cfg.get(key, want) != want:
            raise MlsaeError(f"{folder}: SAELens {key}={cfg[key]!r} has no exact form here (expected {want!r})")
    w = load_file(str(folder / "sae_weights.safetensors"))
    W_enc, b_enc, b_dec = w["W_enc"].T, w["b_enc"], w["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # x W_enc + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec)
        b_enc = b_enc + W_enc @ b_dec
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or folder.name
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    return (int(m[1]) if m else None), dict(W_enc=W_enc, b_enc=b_enc, W_dec=w["W_dec"], b_dec=b_dec, k=int(cfg["k"]))


def _format_of(folder: Path) -> Optional[str]:
    if (folder / "sae_weights.safetensors").is_file() and (folder / "cfg.json").is_file():
        return "saelens"
    if (folder / "sae.safetensors").is_file() and (folder / "cfg.json").is_file():
        return "sparsify"
    return None


def read_bank(source: str | Path, fmt: str = "auto") -> tuple[str, list[LayerSAE]]:
    """The per-layer SAEs in ``source`` (a folder of per-layer folders, or one SAE folder), by layer."""
    source = Path(source)
    if not source.is_dir():
        raise MlsaeError(f"{source} is not a folder of SAEs")
    folders = [source] if _format_of(source) else sorted(p for p in source.iterdir() if p.is_dir() and _format_of(p))
    if not folders:
        raise MlsaeError(f"{source} holds no sparsify (cfg.json + sae.safetensors) or SAELens (cfg.json + sae_weights.safetensors) SAE")
    found = {_format_of(f) for f in folders}
    if fmt == "auto":
        if len(found) > 1:
            raise MlsaeError(f"{source} mixes sparsify and SAELens folders: pass --format")
        fmt = found.pop()
    elif fmt not in FORMATS:
        raise MlsaeError(f"--format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    saes = []
    for folder in folders:
        if _format_of(folder) != fmt:
            continue
        layer, w = (_read_sparsify if fmt == "sparsify" else _read_saelens)(folder)
        if layer is None:
            raise MlsaeError(f"{folder}: cannot tell its layer (expected a folder or hook named "
                             f"{hook_folder(fmt, 0).replace('0', '{l}')})")
        saes.append(LayerSAE(layer=layer, **{k: (v.float() if isinstance(v, Tensor) else v) for k, v in w.items()}))
    saes.sort(key=lambda s: s.layer)
    return fmt, saes


def import_bank(source: str | Path, model, out: str | Path, fmt: str = "auto", ctx: int = 2048, overwrite: bool = False,
                data_settings: Optional[dict] = None) -> Path:
    """A per-layer run in ``out`` holding the per-layer SAEs of ``source`` (trained elsewhere) for
    ``model``, so that eval, analyze and the report read it like a run trained here."""
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise MlsaeError(f"output folder {out} already holds a run; pass --overwrite to replace it")
    fmt, saes = read_bank(source, fmt)
    layers = [s.layer for s in saes]
    if len(set(layers)) != len(layers):
        raise MlsaeError(f"{source} holds two SAEs for layer {next(l for l in layers if layers.count(l) > 1)}")
    model.check_layers(layers)
    shapes = {(tuple(s.W_enc.shape), s.k) for s in saes}
    if len(shapes) > 1:
        raise MlsaeError(f"{source}: the layers' SAEs differ in size or k ({sorted(shapes)}); a per-layer run holds one size for all")
    (n, d), k = shapes.pop()
    if d != model.d_model:
        raise MlsaeError(f"{source}: the SAEs read vectors of {d}, but {model.name} has d_model {model.d_model}")
    cfg = SAEConfig(arch="per-layer", n_latents=n, k=k, standardize=False, center_layers=False, b_pre_init="zero")
    coder = ARRANGEMENTS["per-layer"](cfg, d, layers)
    state = {}
    for i, s in enumerate(saes):
        state.update({f"saes.{i}.W_enc": s.W_enc, f"saes.{i}.b_enc": s.b_enc, f"saes.{i}.W_dec": s.W_dec, f"saes.{i}.b_pre": s.b_dec})
    coder.load_state_dict(state)
    train = {"ctx": ctx, **(data_settings or {})}
    save_coder(coder, out, model.name, model.fingerprint(), {
        "train": train, "finished": True, "world_size": 1,
        "imported": {"format": fmt, "source": str(source), "layers": layers},
    })
    return out
