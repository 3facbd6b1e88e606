"""Sharing runs on the Hugging Face hub: :func:`push_to_hub` and :func:`from_pretrained`.

A hub repo holds what a run folder holds to be loaded (``config.json``, ``sae.safetensors``),
its evaluation (``eval.json``, ``eval.parquet``) when there is one, the per-layer exports for
sparsify and SAELens when the coder has an exact per-layer form (:mod:`mlsae.interop`), and a
generated model card (``README.md``) saying what was trained, on what, how well, and how to load
it in each library. :func:`from_pretrained` takes a repo id (downloaded with
``huggingface_hub``) or a local folder laid out the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import MlsaeError
from .interop import FORMATS, _cannot_export, hook_folder, write_export
from .runs import RunSpec, open_run
from .sae import SparseCoder, load_coder

CARRIED = ("config.json", "sae.safetensors", "eval.json", "eval.parquet")


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id with one line, before anything is staged or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("expected exactly one '/'")
    except HFValidationError as e:
        reason = str(e).strip().splitlines()[0]
        raise MlsaeError(f"repo id {repo_id!r} is malformed ({reason}): expected 'user-or-org/name'") from None


def _eval_rows(run: Path) -> Optional[list[dict]]:
    path = run / "eval.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def model_card(spec: RunSpec, repo_id: str, exported: list[str]) -> str:
    """The README.md of a pushed run: model, layers, data, tokens, settings, the evaluation table,
    and how to load it here and in each library it was exported for."""
    run, meta = spec.folder, spec.meta
    sae, train = meta["sae"], meta.get("train", {})
    progress = meta.get("progress", {})
    lines = [
        "---", "library_name: mlsae", "tags:", "- sparse-autoencoder", "- mlsae", "- interpretability", "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A {sae['arch']} TopK sparse coder trained with mlsae on the residual stream of `{meta['model']}`.", "",
        "| | |", "|---|---|",
        f"| model | `{meta['model']}` (fingerprint `{meta['model_fingerprint']}`) |",
        f"| layers | {', '.join(map(str, meta['layers']))} (block outputs; the last before the final norm) |",
        f"| arrangement | {sae['arch']} |",
        f"| latents | {meta['n_latents']:,} per dictionary, k = {sae['k']} |",
        f"| data | `{train.get('data', 'unknown')}`, context {train.get('ctx', 'unknown')} |",
        f"| tokens | {_cell(progress.get('tokens', train.get('tokens')))} |",
        f"| input transforms | {', '.join(meta.get('transforms', [])) or 'none'} |",
        f"| learning rate | {train.get('lr', 'unknown')} |",
    ]
    if "imported" in meta:
        lines.append(f"| imported from | {meta['imported']['format']} (`{meta['imported']['source']}`) |")
    rows = _eval_rows(run)
    if rows:
        cols = [c for c in ("layer", "fvu", "fvu_standardized", "l0", "dead_fraction", "delta_ce", "kl") if c in rows[0]]
        lines += ["", "## Evaluation (held-out text)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    lines += ["", "## Loading it", "", "With mlsae:", "", "```python", "from mlsae.hub import from_pretrained",
              f'coder, meta = from_pretrained("{repo_id}")', "```"]
    layer = meta["layers"][0]
    if "sparsify" in exported:
        lines += ["", "With sparsify (one SAE per layer, hook points `layers.{l}`):", "", "```python",
                  "from sparsify import SparseCoder",
                  f'sae = SparseCoder.load_from_hub("{repo_id}", hookpoint="sparsify/{hook_folder("sparsify", layer)}")', "```"]
    if "saelens" in exported:
        lines += ["", "With SAELens (hook points `blocks.{l}.hook_resid_post`):", "", "```python",
                  "from huggingface_hub import snapshot_download", "from sae_lens import SAE",
                  f'folder = snapshot_download("{repo_id}")',
                  f'sae = SAE.load_from_disk(f"{{folder}}/saelens/{hook_folder("saelens", layer)}")', "```"]
    missing = [f for f in FORMATS if f not in exported]
    if missing:
        lines += ["", f"Not exported for {' and '.join(missing)}: the coder has no exact per-layer form there."]
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def stage(run: str | Path, repo_id: str, folder: Path) -> list[str]:
    """Lay out in ``folder`` what :func:`push_to_hub` uploads; the formats exported. An unfinished
    run is refused (``runs.open_run``)."""
    spec = open_run(run)
    for name in CARRIED:
        if (spec.folder / name).is_file():
            shutil.copy2(spec.folder / name, folder / name)
    exported = []
    for fmt in FORMATS:
        if _cannot_export(spec.coder, fmt) is None:
            write_export(spec, fmt, folder / fmt)
            exported.append(fmt)
    (folder / "README.md").write_text(model_card(spec, repo_id, exported))
    return exported


def push_to_hub(run: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None, api=None) -> str:
    """Upload ``run`` to the hub repo ``repo_id`` (created if needed) with its model card; the
    repo's address. ``api``: an ``HfApi`` (or a stand-in with the same two methods)."""
    check_repo_id(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        stage(run, repo_id, Path(tmp))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model", commit_message=f"mlsae: {Path(run).name}")
    return f"https://huggingface.co/{repo_id}"


def from_pretrained(repo_id_or_folder: str | Path, device: str = "cpu", revision: Optional[str] = None,
                    token: Optional[str] = None) -> tuple[SparseCoder, dict]:
    """The coder (and its metadata) from a local folder or a hub repo laid out by :func:`push_to_hub`."""
    path = Path(repo_id_or_folder)
    if not path.is_dir():
        check_repo_id(str(repo_id_or_folder))
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(repo_id_or_folder), revision=revision, token=token,
                                      allow_patterns=["config.json", "sae.safetensors", "eval.*", "README.md"]))
    return load_coder(path, device=device)
