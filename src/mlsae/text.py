"""Text sources, tokenising and packing into fixed-length context windows.

A source yields documents (strings). Documents are tokenised without special tokens, each
followed by EOS, concatenated, and cut into windows of ``ctx`` tokens; a window starts with BOS
when the tokenizer would add one itself. Window i belongs to rank ``i % world_size``.
"""

from __future__ import annotations

import importlib
import json
import pydoc
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor

from .errors import MlsaeError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
ONLINE_DEFAULT = "monology/pile-uncopyrighted"
"""The paper's training text, streamed from the hub (needs the internet)."""

# Standard-library modules whose documentation makes the offline corpus: pure Python, importable
# everywhere, no side effects on import. Every tenth module is held out as the test split.
PYDOC_MODULES = (
    "abc argparse array ast asyncio base64 bisect builtins calendar cmath codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis email "
    "enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib "
    "heapq hmac html http imaplib inspect io ipaddress itertools json keyword linecache locale "
    "logging lzma mailbox math mimetypes numbers operator optparse os pathlib pickle pkgutil "
    "platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics "
    "string struct subprocess symtable tabnanny tarfile tempfile textwrap threading time timeit "
    "token tokenize trace traceback types typing unicodedata unittest urllib uuid warnings wave "
    "weakref xml zipfile zipimport zlib zoneinfo"
).split()


def _pydoc_documents(split: str) -> Iterator[str]:
    for i, name in enumerate(PYDOC_MODULES):
        if (i % 10 == 9) != (split == "test"):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield pydoc.render_doc(module, renderer=pydoc.plaintext)


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise MlsaeError(f"{path}:{lineno} has no field {text_field!r} (set --text-field)")
                yield record[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise MlsaeError(f"{path} has no column {text_field!r} (set --text-field)")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()
    else:
        raise MlsaeError(f"{path}: expected a .txt, .jsonl or .parquet file")


def iter_documents(source: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents from a local file or folder, a hub dataset (streamed), or builtin:pydocs."""
    if source in ("builtin", "builtin:pydocs"):
        yield from _pydoc_documents(split)
        return
    check_source(source)
    path = Path(source).expanduser()
    if path.exists():
        files = _files_in(path)
        count = 0
        for file in files:
            for doc in _file_documents(file, text_field):
                if doc:
                    count += 1
                    yield doc
        if count == 0:
            raise MlsaeError(f"data {source} holds no text (every document is empty)")
        return
    yield from _hub_documents(source, split, text_field)


def check_source(source: str) -> None:
    """The checks that need no reading: a local path exists and a folder holds text files.
    Run before a model is loaded, so a typo fails in a second, not after the load."""
    if source in ("builtin", "builtin:pydocs"):
        return
    path = Path(source).expanduser()
    if path.exists():
        if not _files_in(path):
            raise MlsaeError(f"data folder {source} holds no .txt, .jsonl or .parquet files")
        return
    if source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES:
        raise MlsaeError(f"data {source} does not exist (expected a file, a folder, a hub dataset id or builtin:pydocs)")


def _hub_documents(source: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the hub client raises many types; all mean "could not open it"
        raise MlsaeError(f"could not open dataset {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for record in ds:
        if text_field not in record:
            raise MlsaeError(f"dataset {source} has no field {text_field!r} (set --text-field)")
        yield record[text_field]


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def bos_for(tokenizer, prepend_bos: str) -> Optional[int]:
    """The BOS id to start each window with, as ``prepend_bos`` (auto, always, never) says; None for none."""
    if prepend_bos not in ("auto", "always", "never"):
        raise MlsaeError(f"prepend_bos {prepend_bos!r}: expected auto, always or never")
    if prepend_bos == "never" or (prepend_bos == "auto" and not tokenizer_adds_bos(tokenizer)):
        return None
    if tokenizer.bos_token_id is None:
        raise MlsaeError("prepend_bos is 'always' but the tokenizer has no BOS token")
    return int(tokenizer.bos_token_id)


def token_stream(docs: Iterable[str], tokenizer, docs_per_call: int = 64) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, in batches of documents for speed."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False).input_ids
        for ids in encoded:
            yield list(ids) + ([eos] if eos is not None else [])

    for doc in docs:
        batch.append(doc)
        if len(batch) == docs_per_call:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def pack_windows(
    docs: Iterable[str],
    tokenizer,
    ctx: int,
    prepend_bos: str = "auto",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tensor]:
    """Fixed windows ``[ctx]`` (int64) of this rank; the last partial window is dropped."""
    if ctx < 2:
        raise MlsaeError(f"ctx {ctx}: expected a context length of at least 2")
    if not 0 <= rank < world_size:
        raise MlsaeError(f"rank {rank} is out of range for world size {world_size}")
    bos = bos_for(tokenizer, prepend_bos)
    body = ctx - (bos is not None)
    buffer: list[int] = []
    index = 0
    produced = False
    for ids in token_stream(docs, tokenizer):
        buffer.extend(ids)
        while len(buffer) >= body:
            chunk, buffer = buffer[:body], buffer[body:]
            if index % world_size == rank:
                produced = True
                yield torch.tensor(([bos] if bos is not None else []) + chunk, dtype=torch.long)
            index += 1
    if not produced:
        raise MlsaeError(f"the text is shorter than one context window of {ctx} tokens")


def keep_mask(ids: Tensor, special_ids: set[int], exclude_first_position: bool = True) -> Tensor:
    """``[batch, pos]`` bool: True where a position counts (not BOS/EOS/PAD, not position 0)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    for sid in special_ids:
        keep &= ids != sid
    if exclude_first_position:
        keep[..., 0] = False
    return keep


def data_windows(data, tokenizer, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
    """The windows a ``DataConfig`` (or any object with its fields) describes."""
    docs = iter_documents(data.data, data.split, data.text_field)
    return pack_windows(docs, tokenizer, data.ctx, data.prepend_bos, rank, world_size)
