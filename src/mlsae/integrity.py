"""Checksums that let every stage name a truncated or corrupted file instead of reading it.

Checkpoints and analysis folders carry a ``checksums.json`` written last (its presence marks the
folder complete); cache manifests and ``eval.json`` carry the sha256 of their data files.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Optional

from .config import save_json

LISTING = "checksums.json"


def write_failure(e: OSError) -> str:
    """Why a write failed, in a few words (a full disk named as such)."""
    return "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def check_tensors(expected: dict, state: dict, path: str | Path) -> None:
    """Every tensor ``expected`` names (a module's ``state_dict()``) is in ``state``, read from
    ``path``, with its shape: a file of other settings or another version is named, not half-loaded."""
    from .errors import MlsaeError

    for name, tensor in expected.items():
        if name not in state or state[name].shape != tensor.shape:
            got = tuple(state[name].shape) if name in state else "missing"
            raise MlsaeError(f"{path}: tensor {name} is {got}, expected {tuple(tensor.shape)}")


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in ``folder``; written last, it marks the folder complete."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != LISTING and not p.name.endswith(".tmp"))
    save_json(folder / LISTING, {name: sha256(folder / name) for name in files})


def verify_folder(folder: Path) -> Optional[str]:
    """None if every file listed in ``folder/checksums.json`` matches, else what is wrong (one line)."""
    listing = folder / LISTING
    if not listing.is_file():
        return f"{folder} is incomplete (no {LISTING})"
    try:
        expected = json.loads(listing.read_text())
    except ValueError:
        return f"{listing} is corrupted"
    for name, digest in expected.items():
        problem = file_problem(folder / name, digest)
        if problem:
            return problem
    return None


def file_problem(path: Path, digest: Optional[str]) -> Optional[str]:
    """What is wrong with ``path`` against its recorded sha256 (None: fine, or nothing recorded)."""
    if not path.is_file():
        return f"{path} is missing"
    if digest is not None and sha256(path) != digest:
        return f"{path} is corrupted or truncated (its checksum does not match)"
    return None


def recorded_checksum(path: Path) -> Optional[str]:
    """The sha256 recorded for ``path`` in its folder's checksums.json, if any."""
    listing = path.parent / LISTING
    if not listing.is_file():
        return None
    try:
        return json.loads(listing.read_text()).get(path.name)
    except ValueError:
        return None
