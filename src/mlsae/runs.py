"""A run folder and the one place that reads and writes it: the training files (:class:`RunFolder`),
opening its coder (finished or not), and the held-out data that ``eval`` and ``analyze`` both
read, packed the way the run's training text was.

A run folder holds ``config.json`` (the coder's settings, the model, the training settings, the
input transforms, how the coder was started, ``progress`` and whether training ``finished``),
``sae.safetensors`` (the final coder once finished), ``metrics.jsonl``, ``checkpoint/`` (the
latest checkpoint), and what evaluation, analysis and the report write beside them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from . import checkpoint
from .activations import ActivationBatch, ActivationCache, RowBuffer, live_batches
from .config import DataConfig, from_dict
from .errors import MlsaeError
from .model import ResidualModel, special_token_ids
from .sae import SparseCoder, load_coder, read_coder_config, save_coder
from .text import check_source, data_windows, keep_mask


class RunFolder:
    """Writes a training run's folder: the coder with its metadata (``config.json``,
    ``sae.safetensors``), checkpoints (through :mod:`mlsae.checkpoint`) and ``metrics.jsonl``.
    A trainer hands it what to write; it is the only writer of the folder's training files.
    ``writes=False`` (every rank of a data-parallel run but rank 0) makes every write a no-op."""

    FILES = ("config.json", "sae.safetensors", "metrics.jsonl", *checkpoint.NAMES)

    def __init__(self, out: str | Path, model_name: str, fingerprint: str, writes: bool = True):
        self.out = Path(out)
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.writes = writes
        self._metrics = None

    def check_free(self, resume: bool, overwrite: bool) -> None:
        """Refuse to write over another run unless asked (nothing is touched)."""
        if (self.out / "config.json").exists() and not (resume or overwrite):
            raise MlsaeError(f"output folder {self.out} already holds a run; pass --resume to continue it or --overwrite to replace it")

    def clear(self) -> None:
        """Remove an earlier run's training files (``--overwrite``), leaving anything else there."""
        for name in self.FILES if self.writes else ():
            p = self.out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def save(self, coder: SparseCoder, meta: dict, folder: Optional[Path] = None) -> None:
        """The coder and its metadata, in the run folder (or ``folder``, a checkpoint being written)."""
        if self.writes:
            save_coder(coder, folder or self.out, self.model_name, self.fingerprint, meta)

    def save_checkpoint(self, coder: SparseCoder, meta: dict, opt: dict, step: int, tokens: int, clocks: Tensor) -> None:
        """A checkpoint: the whole coder, the optimizer's ``state_dict`` for it, and the trainer's counters."""
        if self.writes:
            checkpoint.save(self.out, lambda folder: self.save(coder, meta, folder), opt, step, tokens, clocks)

    def latest_checkpoint(self) -> Path:
        return checkpoint.latest(self.out)

    def log(self, line: dict) -> None:
        """Append one line to ``metrics.jsonl`` (flushed: a crash loses at most the line being written)."""
        if not self.writes:
            return
        if self._metrics is None:
            self._metrics = open(self.out / "metrics.jsonl", "a")
        self._metrics.write(json.dumps(line) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def drop_metrics_after(self, step: int) -> None:
        """After a crash, the log may hold steps past the checkpoint: they are about to be redone.
        The file is rewritten atomically (a temporary file, then renamed)."""
        path = self.out / "metrics.jsonl"
        if path.exists() and self.writes:
            lines = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            tmp.replace(path)


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a blank or torn line (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class RunSpec:
    """A trained run: its coder, the model it reads and the data settings it was trained with."""

    folder: Path
    coder: SparseCoder
    meta: dict


def is_finished(meta: dict) -> bool:
    """Runs saved before completion was recorded count as finished: they had final weights."""
    return bool(meta.get("finished", True))


def locate_run(folder: str | Path, allow_unfinished: bool = False) -> tuple[Path, dict, Optional[int]]:
    """Where a run's weights are, and its metadata, without loading them: the folder itself once
    training finished; an unfinished run is refused, or (``allow_unfinished``) its newest
    verified checkpoint is named, with the tokens it holds as the third item (None when finished)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlsaeError(f"run folder {folder} does not exist")
    meta = read_coder_config(folder)
    if is_finished(meta):
        if not (folder / "sae.safetensors").is_file():
            raise MlsaeError(f"run folder {folder} is incomplete: no sae.safetensors (was training interrupted? use --resume)")
        return folder, meta, None
    newest = checkpoint.latest(folder, "--allow-unfinished") if any((folder / n).is_dir() for n in checkpoint.NAMES) else None
    trained = checkpoint.read_progress(newest)["tokens"] if newest is not None else 0
    total = meta.get("train", {}).get("tokens")
    done = f"{trained:,} of {total:,} tokens" if isinstance(total, int) else f"{trained:,} tokens"
    if not allow_unfinished:
        raise MlsaeError(
            f"{folder} is an unfinished run ({done} trained): continue it with `mlsae train --resume` and the same "
            f"settings, or pass --allow-unfinished to use its latest checkpoint"
        )
    if newest is None:
        raise MlsaeError(f"{folder} is an unfinished run with no checkpoint yet: nothing was trained")
    return newest, meta, trained


def open_run(folder: str | Path, device: str | torch.device = "cpu", allow_unfinished: bool = False) -> RunSpec:
    """The run's coder, from where :func:`locate_run` says, with a warning for an unfinished run."""
    source, _, partial = locate_run(folder, allow_unfinished)
    if partial is not None:
        print(f"warning: {folder} is unfinished; using its checkpoint at {partial:,} tokens", file=sys.stderr)
    coder, meta = load_coder(source, device=device)
    coder.eval()
    return RunSpec(Path(folder), coder, meta)


def require_data(folder: Path, meta: dict, data: Optional[str]) -> None:
    """Held-out data was named, and (for text) exists: checked before any model is loaded."""
    if not data:
        raise MlsaeError(
            f"no --data given: {folder} needs held-out text (it was trained on {meta.get('train', {}).get('data')})"
        )
    if not (Path(data) / "manifest.json").is_file():
        check_source(data)


def check_model(run: RunSpec, model: ResidualModel) -> None:
    if model.fingerprint() != run.meta["model_fingerprint"]:
        raise MlsaeError(f"model {model.name} is not the model {run.folder} was trained on ({run.meta['model']})")


# --------------------------------------------------------------------------------------------
# Held-out data, shared by eval and analyze


def windows_for_run(run: RunSpec, model: ResidualModel, data: str, split: str, ctx: Optional[int]) -> tuple[Iterator[Tensor], DataConfig]:
    """Windows of other text, packed the way the run's training text was (BOS, exclusions)."""
    trained = from_dict(DataConfig, run.meta.get("train", {}))
    cfg = DataConfig(**{**trained.__dict__, "data": data, "split": split, "ctx": ctx or trained.ctx})
    return data_windows(cfg, model.tokenizer), cfg


def open_cache_for(run: RunSpec, data: str) -> Optional[ActivationCache]:
    """The activation cache ``data`` names (None for text), checksums verified, reading the run's layers."""
    return cache_for(run.meta, data, verify=True)


def cache_for(meta: dict, data: str, verify: bool = False) -> Optional[ActivationCache]:
    """The cache ``data`` names (None for text), refused if captured for another model or without
    one of the run's layers; cheap without ``verify``, so commands check it before loading a model."""
    if not (Path(data) / "manifest.json").is_file():
        return None
    cache = ActivationCache(data, verify=verify, layers=meta["layers"])
    if cache.manifest["model_fingerprint"] != meta["model_fingerprint"]:
        raise MlsaeError(f"evaluation data {data} was tokenised and captured for another model ({cache.manifest['model']}), not {meta['model']}")
    return cache


@dataclass
class HeldOut:
    """Held-out batches of the run's layers, each known by its size before it is read (so the
    processes of a torchrun split them without reading one another's), and the windows they
    come from."""

    parts: Iterator[RowBuffer]
    windows: list[Tensor]  # for text, filled as the parts are listed
    exclude_first_position: bool

    @property
    def batches(self) -> Iterator[ActivationBatch]:
        """Every part, read in order."""
        return (part.load() for part in self.parts)


def held_out(
    run: RunSpec, model: Optional[ResidualModel], cache: Optional[ActivationCache], data: str, split: str,
    ctx: Optional[int], batch_tokens: int,
) -> HeldOut:
    """Batches in file order from a cache, or captured live from text packed like the run's."""
    if cache is not None:
        def cached() -> Iterator[RowBuffer]:
            for start in range(0, len(cache), batch_tokens):
                rows = np.arange(start, min(start + batch_tokens, len(cache)))
                yield RowBuffer(len(rows), lambda rows=rows: cache._read(rows))

        return HeldOut(cached(), list(cache.windows), cache.manifest.get("exclude_first_position", True))
    win_iter, data_cfg = windows_for_run(run, model, data, split, ctx)
    windows: list[Tensor] = []
    excl = data_cfg.exclude_first_position
    special = special_token_ids(model.tokenizer)
    per_batch = max(1, batch_tokens // data_cfg.ctx)

    def captured() -> Iterator[RowBuffer]:
        group: list[Tensor] = []
        for w in itertools.chain(win_iter, [None]):
            if w is not None:
                windows.append(w)
                group.append(w)
            if group and (len(group) == per_batch or w is None):
                first = len(windows) - len(group)
                n_rows = int(keep_mask(torch.stack(group), special, excl).sum())
                yield RowBuffer(n_rows, lambda group=group, first=first: _capture(model, group, first, run.coder.layers, excl))
                group = []

    return HeldOut(captured(), windows, excl)


def _capture(model: ResidualModel, group: list[Tensor], first: int, layers: list[int], excl: bool) -> ActivationBatch:
    """One group of windows through the model; window numbers counted from the text's start."""
    (batch,) = live_batches(model, group, layers, len(group), excl)
    batch.window += first
    return batch
