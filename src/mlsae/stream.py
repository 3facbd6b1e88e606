"""The activation stream: where training batches come from, apart from whoever trains on them.

A stream reads residual-stream vectors live from the model or from a cache, shuffles them with
its own data seed (one epoch after another, each with seed + epoch), cuts them into micro-batches
and starts at a row offset (a resumed run sees exactly the batches an uninterrupted one would).
One stream can feed several trainers (``mlsae sweep``): the language model then runs once for all
of them, and each sees the batches it would have seen alone.

Under torchrun each rank streams its own share: from a cache, the rows at positions
p = rank (mod world size) of the single-process order (so the ranks' micro-batches together are
exactly the single-process micro-batch); live, the windows i = rank (mod world size), each rank
running the model on its own text.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from typing import Iterable, Iterator, Optional, TypeVar

from .activations import ActivationBatch, ActivationCache, RowBuffer, live_buffers, rebatch
from .config import TrainConfig
from .dist import World
from .errors import MlsaeError
from .model import ResidualModel, load_model
from .text import check_source, data_windows


class ActivationStream:
    """Live capture (``cfg.data`` through the model) or a cache (``cfg.cache``), with what every
    consumer needs to know about the vectors: layers, d_model, and the model they come from."""

    def __init__(self, cfg: TrainConfig, model: Optional[ResidualModel] = None, world: World = World()):
        self.world = world
        wanted = sorted(set(cfg.layers)) if cfg.layers is not None else None
        self.cache = ActivationCache(cfg.cache, verify=cfg.verify_cache, layers=wanted) if cfg.cache else None
        if self.cache is not None:
            self.cfg = settings_from_cache(cfg, self.cache.manifest)
            manifest = self.cache.manifest
            self.model: Optional[ResidualModel] = None
            self.layers: list[int] = self.cache.layers
            self.d_model: int = manifest["d_model"]
            self.model_name: str = manifest["model"]
            self.fingerprint: str = manifest["model_fingerprint"]
            self.n_blocks: Optional[int] = manifest.get("n_model_layers")  # caches written before it was recorded: None
        else:
            check_source(cfg.data)
            self.cfg = cfg
            self.model = model or load_model(cfg.model, cfg.model_dtype, cfg.device)
            self.layers = self.model.check_layers(cfg.layers)
            self.d_model = self.model.d_model
            self.model_name = self.model.name
            self.fingerprint = self.model.fingerprint()
            self.n_blocks = self.model.n_layers

    def settle(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the data settings this stream really reads (a cache's packing), so a run
        records them; a setting that contradicts the cache is refused."""
        return settings_from_cache(cfg, self.cache.manifest) if self.cache is not None else cfg

    def _buffers(self) -> Iterator[RowBuffer]:
        """Every epoch's buffers, one epoch after another (seed + epoch shuffles each)."""
        cfg = self.cfg
        w = self.world
        for epoch in itertools.count():
            seed = cfg.seed + epoch
            if self.cache is not None:
                yield from self.cache.buffers(seed, cfg.shuffle_buffer_mb, w.rank, w.size, epoch * len(self.cache))
            else:
                row_bytes = len(self.layers) * self.d_model * 4
                windows_per_buffer = max(1, cfg.shuffle_buffer_mb * 2**20 // (row_bytes * cfg.ctx))
                windows = data_windows(cfg, self.model.tokenizer, w.rank, w.size)
                yield from live_buffers(
                    self.model, windows, self.layers, windows_per_buffer, seed, cfg.windows_per_batch, cfg.exclude_first_position
                )

    def batches(self, micro_batch_tokens: int, skip_rows: int = 0) -> Iterator[ActivationBatch]:
        """This rank's micro-batches of exactly ``micro_batch_tokens`` rows from its row
        ``skip_rows`` on (rows before it are skipped without being read or captured). With
        ``cfg.prefetch`` on, the next ones are read (captured) in a background thread while the
        caller trains on these."""
        batches = rebatch(self._buffers(), micro_batch_tokens, skip_rows=skip_rows, drop_last=True)
        return prefetched(batches, PREFETCH_DEPTH) if self.prefetching() else batches

    def prefetching(self) -> bool:
        """``--prefetch auto``: on when the vectors come from a model on a GPU (the capture then
        overlaps the coder's step); off on CPU, where both would share the same cores."""
        if self.cfg.prefetch != "auto":
            return self.cfg.prefetch == "on"
        return self.model is not None and self.model.device.type == "cuda"


PREFETCH_DEPTH = 4
"""Micro-batches read ahead by a prefetching stream."""

T = TypeVar("T")


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` in order, produced by a daemon thread up to ``depth`` ahead of the consumer; an
    exception in the producer is raised in the consumer at the item where it happened."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(e)

    threading.Thread(target=produce, daemon=True, name="mlsae-prefetch").start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not slots.empty():  # unblock a producer waiting on a full queue
            slots.get_nowait()


def settings_from_cache(cfg: TrainConfig, manifest: dict) -> TrainConfig:
    """The data settings a cache was captured with, recorded in the run (eval packs held-out text
    the same way). A value given on the command line that contradicts the cache is refused."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    taken = {}
    for name in ("ctx", "exclude_first_position", "prepend_bos"):
        cached, given = manifest.get(name), getattr(cfg, name)
        if cached is None or given == cached:
            continue
        if given != defaults[name]:
            flag = "--" + name.replace("_", "-")
            raise MlsaeError(f"{flag} {given!r} contradicts the cache {cfg.cache}, captured with {cached!r}: drop {flag} or recapture")
        taken[name] = cached
    for name in ("data", "split"):  # what the activations really came from
        if manifest.get(name) is not None:
            taken[name] = manifest[name]
    return dataclasses.replace(cfg, **taken)
