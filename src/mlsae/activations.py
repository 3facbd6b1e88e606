"""Batches of residual-stream vectors ``[tokens, layers, d_model]``, live or from a disk cache.

Only positions that count are kept (special tokens and, by default, each window's first
position are dropped), each with its token id and its (window, position) address so analyses
can show the context.

A cache folder holds ``manifest.json``, ``windows.npy`` (the token ids of every window),
and per shard ``acts-NNNNN.bin`` (a raw memory-mappable ``[rows, layers, d]`` array) with
``rows-NNNNN.npy`` (``[rows, 2]`` window and position of each row).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import save_json
from .integrity import sha256, write_failure
from .errors import MlsaeError
from .model import ResidualModel, parse_dtype, special_token_ids
from .text import keep_mask

CACHE_FORMAT = 1
# numpy has no bfloat16: bfloat16 rows are stored as their raw 16-bit patterns.
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


@dataclass
class ActivationBatch:
    acts: Tensor  # [tokens, layers, d_model]
    token_ids: Tensor  # [tokens]
    window: Tensor  # [tokens] index of the window each row comes from
    position: Tensor  # [tokens] position in that window

    def __len__(self) -> int:
        return self.acts.shape[0]

    def take(self, index: Tensor) -> "ActivationBatch":
        return ActivationBatch(self.acts[index], self.token_ids[index], self.window[index], self.position[index])

    def slice(self, start: int, stop: int) -> "ActivationBatch":
        return ActivationBatch(
            self.acts[start:stop], self.token_ids[start:stop], self.window[start:stop], self.position[start:stop]
        )


def live_batches(
    model: ResidualModel,
    windows: Iterable[Tensor],
    layers: Optional[Sequence[int]] = None,
    windows_per_batch: int = 8,
    exclude_first_position: bool = True,
) -> Iterator[ActivationBatch]:
    """Run the model over groups of windows and yield the kept positions' block outputs."""
    layers = model.check_layers(layers)
    special = special_token_ids(model.tokenizer)
    group: list[Tensor] = []
    first_window = 0

    def run(group: list[Tensor], first: int) -> ActivationBatch:
        ids = torch.stack(group)  # [batch, pos]
        acts = model.capture(ids, layers)  # [batch, pos, layers, d]
        keep = keep_mask(ids, special, exclude_first_position)
        win, pos = keep.nonzero(as_tuple=True)
        return ActivationBatch(acts[win, pos], ids[win, pos], (win + first), pos)

    for window in windows:
        group.append(window)
        if len(group) == windows_per_batch:
            yield run(group, first_window)
            first_window += len(group)
            group = []
    if group:
        yield run(group, first_window)


def check_finite(acts: Tensor, what: str, layers: Sequence[int]) -> None:
    """Refuse NaN/inf activations, naming the first bad layer."""
    bad = ~torch.isfinite(acts).all(dim=-1)  # [tokens, layers]
    if bad.any():
        layer_pos = int(bad.any(dim=0).nonzero()[0])
        raise MlsaeError(f"{what}: NaN or inf activations at layer {layers[layer_pos]}")


# --------------------------------------------------------------------------------------------
# Disk cache


def write_cache(
    model: ResidualModel,
    windows: Iterable[Tensor],
    out: str | Path,
    tokens: int,
    layers: Optional[Sequence[int]] = None,
    dtype: str = "float32",
    shard_tokens: int = 65_536,
    windows_per_batch: int = 8,
    exclude_first_position: bool = True,
    overwrite: bool = False,
    extra: Optional[dict] = None,
) -> dict:
    """Capture ``tokens`` kept positions into a cache folder; returns the manifest."""
    out = Path(out)
    if (out / "manifest.json").exists() and not overwrite:
        raise MlsaeError(f"cache folder {out} already holds a cache; pass --overwrite to replace it")
    if tokens <= 0:
        raise MlsaeError(f"tokens {tokens}: expected a positive number of tokens")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("acts-*.bin")) + list(out.glob("rows-*.npy")) + list(out.glob("manifest.json")):
        old.unlink()
    torch_dtype = parse_dtype(dtype, "cache dtype")
    layers = model.check_layers(layers)
    row_shape = (len(layers), model.d_model)
    shards: list[dict] = []
    kept_windows: list[Tensor] = []
    pending: list[ActivationBatch] = []
    pending_rows = 0
    written = 0
    started = time.perf_counter()

    def flush(batches: list[ActivationBatch]) -> None:
        acts = torch.cat([b.acts for b in batches]).to("cpu", torch_dtype)
        rows = torch.stack([torch.cat([b.window for b in batches]), torch.cat([b.position for b in batches])], 1)
        name = f"{len(shards):05d}"
        array = acts.view(torch.int16).numpy().view(np.uint16) if torch_dtype == torch.bfloat16 else acts.numpy()
        try:
            array.tofile(out / f"acts-{name}.bin")
            np.save(out / f"rows-{name}.npy", rows.numpy().astype(np.int32))
        except OSError as e:
            raise MlsaeError(f"could not write cache shard {name} in {out}: {write_failure(e)}") from None
        shards.append({
            "acts": f"acts-{name}.bin", "rows": f"rows-{name}.npy", "n": int(acts.shape[0]),
            "acts_sha256": hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest(),
            "rows_sha256": sha256(out / f"rows-{name}.npy"),
        })

    def windows_seen() -> Iterator[Tensor]:
        for w in windows:
            kept_windows.append(w)
            yield w

    with tqdm(total=tokens, unit="tok", desc="caching", smoothing=0.1) as bar:  # closed before an error is printed
        batches = live_batches(model, windows_seen(), layers, windows_per_batch, exclude_first_position)
        for batch in batches:
            batch = batch.slice(0, tokens - written)
            check_finite(batch.acts, f"cache step at window {int(batch.window[0])}", layers)
            pending.append(batch)
            pending_rows += len(batch)
            written += len(batch)
            bar.update(len(batch))
            while pending_rows >= shard_tokens:
                merged = _merge(pending)
                flush([merged.slice(0, shard_tokens)])
                pending = [merged.slice(shard_tokens, len(merged))]
                pending_rows = len(pending[0])
            if written >= tokens:
                break
    if pending_rows:
        flush(pending)
    if written < tokens:
        raise MlsaeError(f"the text ran out after {written} of {tokens} tokens; use more data or fewer tokens")
    ids = torch.stack(kept_windows).numpy().astype(np.int32)
    np.save(out / "windows.npy", ids)
    seconds = time.perf_counter() - started
    manifest = {
        "format": CACHE_FORMAT,
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "layers": layers,
        "d_model": model.d_model,
        "n_model_layers": model.n_layers,
        "dtype": dtype,
        "n_tokens": written,
        "n_windows": int(ids.shape[0]),
        "ctx": int(ids.shape[1]),
        "exclude_first_position": exclude_first_position,
        "shards": shards,
        "capture_seconds": seconds,
        "row_bytes": int(np.prod(row_shape)) * torch.tensor([], dtype=torch_dtype).element_size(),
        **(extra or {}),
    }
    save_json(out / "manifest.json", manifest)
    return manifest


def _merge(batches: list[ActivationBatch]) -> ActivationBatch:
    return ActivationBatch(
        torch.cat([b.acts for b in batches]),
        torch.cat([b.token_ids for b in batches]),
        torch.cat([b.window for b in batches]),
        torch.cat([b.position for b in batches]),
    )


class ActivationCache:
    """Read a cache folder; shards are memory-mapped, never loaded whole.

    Every shard's size is checked on opening (a truncated file is named and refused);
    ``verify=True`` also checks each file's sha256 against the manifest (one full read).
    ``layers`` reads a subset of the stored layers (a coder trained on 6 of 30 captured layers).
    """

    def __init__(self, folder: str | Path, verify: bool = False, layers: Optional[Sequence[int]] = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise MlsaeError(f"cache folder {folder} has no manifest.json (write one with `mlsae cache`)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise MlsaeError(f"cache {folder} has format {self.manifest.get('format')}; this version reads {CACHE_FORMAT}")
        stored: list[int] = self.manifest["layers"]
        self.layers = stored if layers is None else list(layers)
        missing = [layer for layer in self.layers if layer not in stored]
        if missing:
            raise MlsaeError(f"cache {self.folder} holds layers {stored}, not layer {missing[0]}: capture the layers the run needs")
        self._columns = None if self.layers == stored else np.array([stored.index(layer) for layer in self.layers])
        self.dtype = parse_dtype(self.manifest["dtype"], "cache dtype")
        self._check_sizes()
        if verify:
            self.verify()
        self.windows = torch.from_numpy(np.load(self.folder / "windows.npy").astype(np.int64))
        self._rows = [np.load(self.folder / s["rows"]) for s in self.manifest["shards"]]
        self._offsets = np.cumsum([0] + [s["n"] for s in self.manifest["shards"]])

    def _check_sizes(self) -> None:
        row_bytes = self.manifest["row_bytes"]
        for shard in self.manifest["shards"]:
            path = self.folder / shard["acts"]
            if not path.is_file():
                raise MlsaeError(f"cache {self.folder}: shard {path.name} is missing")
            if path.stat().st_size != shard["n"] * row_bytes:
                raise MlsaeError(
                    f"cache {self.folder}: shard {path.name} is truncated or damaged ({path.stat().st_size:,} bytes, "
                    f"expected {shard['n'] * row_bytes:,}); recapture it with `mlsae cache --overwrite`"
                )

    def verify(self) -> None:
        """Check every shard against the sha256 in the manifest (caches written before checksums pass)."""
        shards = self.manifest["shards"]
        for shard in tqdm(shards, desc="verifying the cache", unit="shard", leave=False, disable=len(shards) < 2):
            for key in ("acts", "rows"):
                expected = shard.get(f"{key}_sha256")
                if expected is not None and sha256(self.folder / shard[key]) != expected:
                    raise MlsaeError(
                        f"cache {self.folder}: {shard[key]} is corrupted (its checksum does not match the manifest); "
                        f"recapture it with `mlsae cache --overwrite`"
                    )

    def _map(self, shard: dict) -> np.ndarray:
        shape = (shard["n"], len(self.manifest["layers"]), self.manifest["d_model"])
        return np.memmap(self.folder / shard["acts"], dtype=_STORAGE[self.dtype], mode="r", shape=shape)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def check_matches(self, model_fingerprint: Optional[str] = None, layers: Optional[Sequence[int]] = None, dtype: Optional[str] = None) -> None:
        """Refuse a cache written for another model, layer set or dtype."""
        m = self.manifest
        if model_fingerprint is not None and m["model_fingerprint"] != model_fingerprint:
            raise MlsaeError(f"cache {self.folder} was written for another model ({m['model']}, fingerprint {m['model_fingerprint']})")
        if layers is not None and list(layers) != self.layers:
            raise MlsaeError(f"cache {self.folder} holds layers {self.layers}, not the requested {list(layers)}")
        if dtype is not None and dtype != m["dtype"]:
            raise MlsaeError(f"cache {self.folder} is stored as {m['dtype']}, not the requested {dtype}")

    def _read(self, index: np.ndarray) -> ActivationBatch:
        """Rows at sorted global indices."""
        shard = np.searchsorted(self._offsets, index, side="right") - 1
        acts, rows = [], []
        for s in np.unique(shard):
            local = index[shard == s] - self._offsets[s]
            # mapped for this read only: pages of a mapping that stays open count as this process's
            # memory, so a long pass would grow with the cache; unmapped, the OS may drop them
            rows_of_shard = self._map(self.manifest["shards"][s])[local]
            if self._columns is not None:
                rows_of_shard = rows_of_shard[:, self._columns]
            acts.append(torch.from_numpy(np.ascontiguousarray(rows_of_shard)))
            rows.append(self._rows[s][local])
        a = torch.cat(acts)
        if self.dtype == torch.bfloat16:
            a = a.view(torch.bfloat16)
        r = torch.from_numpy(np.concatenate(rows).astype(np.int64))
        return ActivationBatch(a.float(), self.windows[r[:, 0], r[:, 1]], r[:, 0], r[:, 1])

    def buffers(self, seed: int = 0, buffer_mb: int = 512, rank: int = 0, world_size: int = 1,
                position: int = 0) -> Iterator["RowBuffer"]:
        """The rows in a seeded random order, as buffers that fit in ``buffer_mb``.

        Shuffling is two-level so memory stays bounded: the rows are cut into blocks, the
        blocks are visited in a random order, and the rows of a buffer of several blocks are
        permuted together. Nothing is read until a buffer is loaded.

        With ``world_size`` ranks, rank r gets the rows at the positions p = r (mod world_size)
        of that order (``position``: where this pass starts in the whole stream), and reads only
        those: cut into micro-batches of m / world_size rows, its batches are the rank's share
        of the single-process micro-batches of m rows, exactly.
        """
        rng = np.random.default_rng(seed)
        row_bytes = self.manifest["row_bytes"] * 4 // torch.tensor([], dtype=self.dtype).element_size()
        buffer_rows = max(1, buffer_mb * 2**20 // row_bytes)
        block = max(1, buffer_rows // 16)
        order = np.arange(len(self))
        blocks = [order[i : i + block] for i in range(0, len(order), block)]
        rng.shuffle(blocks)
        per_buffer = max(1, buffer_rows // block)
        for b in range(0, len(blocks), per_buffer):
            index = np.sort(np.concatenate(blocks[b : b + per_buffer]))
            perm = rng.permutation(len(index))
            if world_size > 1:
                perm = perm[(position + np.arange(len(perm))) % world_size == rank]
            position += len(index)
            yield RowBuffer(len(perm), lambda rows=index[perm]: self._read_in_order(rows))

    def _read_in_order(self, rows: np.ndarray) -> ActivationBatch:
        """Rows at global indices in the given order (read sorted, then put in that order)."""
        order = np.argsort(rows, kind="stable")
        back = torch.empty(len(rows), dtype=torch.long)
        back[torch.from_numpy(order)] = torch.arange(len(rows))
        return self._read(rows[order]).take(back)

    def batches(self, batch_tokens: int, shuffle: bool = True, seed: int = 0, buffer_mb: int = 512) -> Iterator[ActivationBatch]:
        """Batches of ``batch_tokens`` rows (the last may be shorter), shuffled or in file order."""
        if shuffle:
            yield from rebatch(self.buffers(seed, buffer_mb), batch_tokens)
            return
        for i in range(0, len(self), batch_tokens):
            yield self._read(np.arange(i, min(i + batch_tokens, len(self))))


@dataclass
class RowBuffer:
    """A group of rows known by its size before it is loaded, so skipping costs nothing."""

    n_rows: int
    load: Callable[[], ActivationBatch]


def rebatch(buffers: Iterable[RowBuffer], batch_tokens: int, skip_rows: int = 0, drop_last: bool = False) -> Iterator[ActivationBatch]:
    """Cut the concatenation of the buffers into batches of ``batch_tokens`` rows.

    The first ``skip_rows`` rows are skipped without loading whole buffers they cover, so a
    resumed run sees exactly the batches an uninterrupted one would.
    """
    leftover: Optional[ActivationBatch] = None
    for buf in buffers:
        if skip_rows >= buf.n_rows:
            skip_rows -= buf.n_rows
            continue
        data = buf.load()
        if skip_rows:
            data, skip_rows = data.slice(skip_rows, len(data)), 0
        if leftover is not None:
            data = _merge([leftover, data])
        full = len(data) - len(data) % batch_tokens
        for i in range(0, full, batch_tokens):
            yield data.slice(i, i + batch_tokens)
        leftover = data.slice(full, len(data)) if full < len(data) else None
    if leftover is not None and not drop_last:
        yield leftover


def live_buffers(
    model: ResidualModel,
    windows: Iterable[Tensor],
    layers: Optional[Sequence[int]],
    windows_per_buffer: int,
    seed: int = 0,
    windows_per_batch: int = 8,
    exclude_first_position: bool = True,
) -> Iterator[RowBuffer]:
    """Buffers of ``windows_per_buffer`` windows, captured on load and permuted with a seeded order.

    A buffer's size comes from the token ids alone, so skipped buffers never run the model.
    """
    special = special_token_ids(model.tokenizer)
    group: list[Tensor] = []
    first = 0

    def make(group: list[Tensor], first: int, index: int) -> RowBuffer:
        n_rows = int(keep_mask(torch.stack(group), special, exclude_first_position).sum())

        def load() -> ActivationBatch:
            parts = []
            # capturing a large buffer takes a while: show it, so no bar sits still at 0%
            with tqdm(total=n_rows, unit="tok", desc="filling the shuffle buffer", leave=False) as bar:
                for part in live_batches(model, group, layers, windows_per_batch, exclude_first_position):
                    parts.append(part)
                    bar.update(len(part))
            data = _merge(parts)
            data.window += first
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            return data.take(torch.randperm(len(data), generator=g))

        return RowBuffer(n_rows, load)

    index = 0
    for w in windows:
        group.append(w)
        if len(group) == windows_per_buffer:
            yield make(group, first, index)
            first, index, group = first + len(group), index + 1, []
    if group:
        yield make(group, first, index)


def mb_per_1k_tokens(n_layers: int, d_model: int, dtype: str) -> float:
    """Disk size of a cache per 1,000 tokens (activations only; ids and rows add ~8 bytes/token)."""
    size = torch.tensor([], dtype=parse_dtype(dtype)).element_size()
    return 1000 * n_layers * d_model * size / 1e6

