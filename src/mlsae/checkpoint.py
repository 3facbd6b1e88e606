"""The training checkpoint on disk: plain tensor files and JSON, checksummed, swapped in atomically.

A checkpoint folder holds the coder (``config.json``, ``sae.safetensors``), the trainer's
tensors (``trainer.safetensors``: the optimizer's moment estimates and the dead-latent clocks),
its scalars (``trainer.json``: step, tokens, the optimizer's settings) and, written last,
``checksums.json`` (sha256 of each file). Nothing is unpickled: a checkpoint handed over by
someone else cannot run code. A folder without a matching ``checksums.json`` is incomplete or
corrupted and is never loaded.

Writes go to ``checkpoint.tmp``; the previous ``checkpoint`` becomes ``checkpoint.old`` until
the new one is in place, so a crash at any point leaves at least one complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .config import save_json
from .integrity import verify_folder, write_checksums, write_failure
from .errors import MlsaeError

NAMES = ("checkpoint", "checkpoint.old")  # newest first


def save(out: Path, write_coder: Callable[[Path], None], opt: dict, step: int, tokens: int, clocks: torch.Tensor) -> None:
    """Write a checkpoint of the trainer into ``out/checkpoint``, keeping the previous one intact
    (``opt``: the optimizer's ``state_dict()`` for the whole coder)."""
    tmp, final, old = out / "checkpoint.tmp", out / NAMES[0], out / NAMES[1]
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_coder(tmp)
        tensors = {f"optimizer.{i}.{k}": v.detach().contiguous().cpu() for i, st in opt["state"].items() for k, v in st.items()}
        tensors["tokens_since_fired"] = clocks.detach().contiguous().cpu()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        save_json(tmp / "trainer.json", {"step": step, "tokens": tokens, "param_groups": opt["param_groups"]})
        write_checksums(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MlsaeError(f"could not write a checkpoint in {out}: {write_failure(e)}; the previous checkpoint is kept") from None
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest(out: Path, purpose: str = "--resume") -> Path:
    """The newest complete, uncorrupted checkpoint folder, or a clear error naming what is wrong."""
    problems = []
    for name in NAMES:
        folder = out / name
        if not folder.is_dir():
            continue
        problem = verify_folder(folder)
        if problem is None:
            return folder
        problems.append(problem)
    if problems:
        raise MlsaeError(f"{purpose}: no usable checkpoint in {out}: {'; '.join(problems)}")
    raise MlsaeError(f"{purpose}: {out} holds no checkpoint to resume from")


def load_trainer(folder: Path, device: torch.device) -> tuple[dict, int, int, torch.Tensor]:
    """A verified checkpoint's trainer: (the optimizer's state_dict for the whole coder, step,
    tokens, dead-latent clocks)."""
    scalars = json.loads((folder / "trainer.json").read_text())
    tensors = load_file(str(folder / "trainer.safetensors"))  # on CPU: load_state_dict moves the moments to the params
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt = {"state": state, "param_groups": scalars["param_groups"]}
    return opt, scalars["step"], scalars["tokens"], tensors["tokens_since_fired"].to(device)


def read_progress(folder: Path) -> dict:
    """Step and tokens of a checkpoint (for messages and tests)."""
    scalars = json.loads((folder / "trainer.json").read_text())
    return {"step": scalars["step"], "tokens": scalars["tokens"]}
