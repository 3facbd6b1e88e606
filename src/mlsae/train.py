"""The training loop: losses, dead-latent tracking, decoder normalisation, checkpoints, resume.

A run folder holds ``config.json`` (the sparse coder's settings, the model it reads and the
training settings), ``sae.safetensors`` (the final coder), ``metrics.jsonl`` and
``checkpoint/`` (coder, optimizer and counters, for an exact ``--resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .activations import ActivationBatch, ActivationCache, RowBuffer, check_finite, live_buffers, rebatch
from .config import SAEConfig, TrainConfig, save_json, subset, to_dict, validate
from .errors import MlsaeError
from .lens import check_lens_for, load_lens
from .model import ResidualModel, load_model, resolve_device
from .sae import ARRANGEMENTS, LEGACY_SAE_SETTINGS, SparseCoder, load_coder, read_coder_config, save_coder
from .text import check_source, data_windows


RESUMABLE_CHANGES = frozenset(
    {"tokens", "checkpoint_tokens", "wandb", "resume", "overwrite", "device", "out", "cache", "model", "verify_cache"}
)
"""Settings a resumed run may change: they do not alter what it computes (the cache and model
are checked by content: the same model fingerprint and layers)."""

B_PRE_START = {"geometric_median": "the geometric median", "mean": "the mean", "zero": "zero"}


@dataclass
class TrainState:
    """Everything besides the weights and optimizer that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    tokens_since_fired: Optional[torch.Tensor] = None  # [latent_shape] int64


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Optional[ResidualModel] = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self._check_settings()
        wanted = sorted(set(cfg.layers)) if cfg.layers is not None else None
        self.cache = ActivationCache(cfg.cache, verify=cfg.verify_cache, layers=wanted) if cfg.cache else None
        if self.cache is not None:
            self.cfg = cfg = settings_from_cache(cfg, self.cache.manifest)
            self.layers = self.cache.layers
            self.d_model = self.cache.manifest["d_model"]
            self.model_name = self.cache.manifest["model"]
            self.fingerprint = self.cache.manifest["model_fingerprint"]
            self.model = None
        else:
            check_source(cfg.data)
            self.model = model or load_model(cfg.model, cfg.model_dtype, cfg.device)
            self.layers = self.model.check_layers(cfg.layers)
            self.d_model = self.model.d_model
            self.model_name = self.model.name
            self.fingerprint = self.model.fingerprint()
        if cfg.arch not in ARRANGEMENTS:
            raise MlsaeError(f"arch {cfg.arch!r}: expected one of {', '.join(ARRANGEMENTS)}")
        self.coder: SparseCoder = ARRANGEMENTS[cfg.arch](subset(cfg, SAEConfig), self.d_model, self.layers, cfg.seed)
        self.lens_info = self._attach_lens() if cfg.lens else None
        self.coder.to(self.device)
        self._check_memory()
        self.optimizer = torch.optim.Adam(self.coder.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.state = TrainState(tokens_since_fired=torch.zeros(self.coder.latent_shape(), dtype=torch.long, device=self.device))
        self.init_info: Optional[dict] = None  # how the coder was started; saved in config.json
        self.finished = False
        self._prepare_folder()

    def _attach_lens(self) -> dict:
        """Load ``--lens``, refuse one made for another model, and give the coder its translators."""
        lens, meta = load_lens(self.cfg.lens)
        n_blocks = self.model.n_layers if self.model is not None else self.cache.manifest.get("n_model_layers")
        check_lens_for(lens, meta, f"--lens {self.cfg.lens}", self.model_name, self.fingerprint, n_blocks)
        self.coder.set_lens(lens)
        return {"path": str(self.cfg.lens), "sha256": meta["hash"], "source": meta["source"]}

    # ---------------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        c = self.cfg
        validate(c)  # the same check the command line runs: a Python caller gets it too
        micro = min(c.micro_batch_tokens, c.tokens_per_step)
        if c.tokens_per_step % micro:
            raise MlsaeError(
                f"tokens_per_step {c.tokens_per_step} is not a multiple of micro_batch_tokens {c.micro_batch_tokens}"
            )
        self.micro = micro

    def _check_memory(self) -> None:
        """Refuse a micro-batch whose encoder pre-activations alone cannot fit, before any work.

        The TopK encoder holds ``[vectors, n_latents]`` fp32 pre-activations (and about as much
        again in the step's temporaries); an MLSAE codes every layer of a token at once.
        """
        per_token = len(self.layers) if self.coder.latent_space == "shared" else 1
        need = 2 * 4 * self.micro * per_token * self.coder.n_latents
        if self.device.type == "cuda":
            have = torch.cuda.get_device_properties(self.device).total_memory
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > 0.8 * have:
            fits = 2 ** int(math.log2(max(1, 0.8 * have / (2 * 4 * per_token * self.coder.n_latents))))
            raise MlsaeError(
                f"--micro-batch-tokens {self.micro} needs about {need / 2**30:.0f} GiB for the encoder's pre-activations "
                f"({self.micro} tokens x {per_token} layers x {self.coder.n_latents:,} latents), more than this "
                f"{self.device.type} memory ({have / 2**30:.0f} GiB) allows: lower --micro-batch-tokens (to {fits} or less)"
            )

    def _run_meta(self) -> dict:
        meta = {
            "train": to_dict(self.cfg),
            "transforms": self.coder.transform.describe(),
            "progress": {"step": self.state.step, "tokens": self.state.tokens},
            "finished": self.finished,
        }
        if self.init_info is not None:
            meta["init"] = self.init_info
        if self.lens_info is not None:
            meta["lens"] = self.lens_info
        return meta

    def _prepare_folder(self) -> None:
        existing = self.out / "config.json"
        if existing.exists() and not (self.cfg.resume or self.cfg.overwrite):
            raise MlsaeError(f"output folder {self.out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if self.cfg.resume:
            self._resume()
            return
        if self.cfg.overwrite and self.out.exists():
            for name in ("config.json", "sae.safetensors", "metrics.jsonl", "checkpoint", "checkpoint.old"):
                p = self.out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        save_coder(self.coder, self.out, self.model_name, self.fingerprint, self._run_meta())

    # ---------------------------------------------------------------------------------------
    # Checkpoints: written to checkpoint.tmp, then swapped in; the previous one survives a crash.

    def save_checkpoint(self) -> None:
        checkpoint.save(
            self.out,
            lambda folder: save_coder(self.coder, folder, self.model_name, self.fingerprint, self._run_meta()),
            self.optimizer, self.state.step, self.state.tokens, self.state.tokens_since_fired,
        )

    def _resume(self) -> None:
        folder = checkpoint.latest(self.out)
        saved = read_coder_config(folder)
        if saved["sae"]["arch"] != self.cfg.arch:
            raise MlsaeError(f"--resume: {self.out} holds a {saved['sae']['arch']} run, not {self.cfg.arch}")
        coder, _ = load_coder(folder, model_fingerprint=self.fingerprint, arch=self.cfg.arch, device=self.device)
        if saved["layers"] != self.layers:
            raise MlsaeError(f"--resume: the run in {self.out} was trained on layers {saved['layers']}, not {self.layers}")
        self._check_unchanged({**LEGACY_SAE_SETTINGS, **saved["sae"], **saved.get("train", {})})
        recorded = (saved.get("lens") or {}).get("sha256")
        if self.lens_info is not None and recorded != self.lens_info["sha256"]:
            raise MlsaeError(
                f"--lens {self.cfg.lens} is not the lens this run was trained with (sha256 {str(recorded)[:12]} recorded, "
                f"{self.lens_info['sha256'][:12]} now): resume with that lens"
            )
        self.coder.load_state_dict(coder.state_dict())
        step, tokens, clocks = checkpoint.load_trainer(folder, self.optimizer, self.device)
        self.state = TrainState(step, tokens, clocks)
        self.init_info = saved.get("init")
        self._drop_metrics_after(self.state.step)

    def _check_unchanged(self, saved: dict) -> None:
        """Refuse a resume whose settings would make the result differ from an uninterrupted run."""
        now = to_dict(self.cfg)
        for name, value in now.items():
            if name in RESUMABLE_CHANGES or name not in saved or saved[name] == value:
                continue
            flag = "--" + name.replace("_", "-")
            raise MlsaeError(
                f"--resume: {flag} is {value!r} but the run in {self.out} was trained with {saved[name]!r}; a resumed run "
                f"must keep every setting that changes its result (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
            )

    def _drop_metrics_after(self, step: int) -> None:
        """After a crash, the log may hold steps past the checkpoint: they are about to be redone.
        The file is rewritten atomically (a temporary file, then renamed)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in lines))
            tmp.replace(path)

    # ---------------------------------------------------------------------------------------
    def _buffers(self) -> Iterator[RowBuffer]:
        """Every epoch's buffers, one epoch after another (seed + epoch shuffles each)."""
        cfg = self.cfg
        for epoch in itertools.count():
            seed = cfg.seed + epoch
            if self.cache is not None:
                yield from self.cache.buffers(seed, cfg.shuffle_buffer_mb)
            else:
                row_bytes = len(self.layers) * self.d_model * 4
                windows_per_buffer = max(1, cfg.shuffle_buffer_mb * 2**20 // (row_bytes * cfg.ctx))
                windows = data_windows(cfg, self.model.tokenizer)
                yield from live_buffers(
                    self.model, windows, self.layers, windows_per_buffer, seed, cfg.windows_per_batch, cfg.exclude_first_position
                )

    def train(self) -> dict:
        cfg = self.cfg
        micro_per_step = cfg.tokens_per_step // self.micro
        batches = rebatch(self._buffers(), self.micro, skip_rows=self.state.tokens, drop_last=True)
        metrics_file = open(self.out / "metrics.jsonl", "a")
        wandb_run = _start_wandb(cfg) if cfg.wandb else None
        bar = tqdm(total=cfg.tokens, initial=self.state.tokens, unit="tok", desc=f"train {cfg.arch}", smoothing=0.05)
        next_checkpoint = (self.state.tokens // cfg.checkpoint_tokens + 1) * cfg.checkpoint_tokens
        started, start_tokens = time.perf_counter(), self.state.tokens
        last: dict = {}
        try:
            if self.state.step == 0:  # a fresh start: fit the transforms and b_pre, then train on the same batches
                first = self._initialise(batches, metrics_file)
                batches = itertools.chain(first, batches)
            while self.state.tokens < cfg.tokens:
                # the last step is cut to what was asked: never more tokens than --tokens
                remaining = cfg.tokens - self.state.tokens
                micro_batches = list(itertools.islice(batches, min(micro_per_step, -(-remaining // self.micro))))
                if not micro_batches:
                    raise MlsaeError("the activation source produced no data")
                if sum(len(b) for b in micro_batches) > remaining:
                    micro_batches[-1] = micro_batches[-1].slice(0, remaining - sum(len(b) for b in micro_batches[:-1]))
                last = self._step(micro_batches)
                elapsed = time.perf_counter() - started
                last["tokens_per_s"] = (self.state.tokens - start_tokens) / max(elapsed, 1e-9)
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if wandb_run is not None:
                    wandb_run.log(last, step=self.state.step)
                bar.update(last["step_tokens"])
                bar.set_postfix(loss=f"{last['loss']:.4f}", fvu=f"{last['fvu']:.4f}", dead=f"{100 * last['dead_fraction']:.1f}%")
                if self.state.tokens >= next_checkpoint:
                    self.save_checkpoint()
                    next_checkpoint += cfg.checkpoint_tokens
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            print(f"\ninterrupted: saved a checkpoint at {self.state.tokens:,} tokens; continue with --resume")
            raise
        finally:
            bar.close()
            metrics_file.close()
            if wandb_run is not None:
                wandb_run.finish()
        self.save_checkpoint()
        self.finished = True
        save_coder(self.coder, self.out, self.model_name, self.fingerprint, self._run_meta())
        return last

    def _initialise(self, batches: Iterator[ActivationBatch], metrics_file) -> list[ActivationBatch]:
        """Fit the frozen input transforms and start b_pre on the first ``init_tokens`` tokens; log
        the initial FVU (step 0). Returns the batches read, which training then uses as usual."""
        cfg = self.cfg
        first: list[ActivationBatch] = []
        while sum(len(b) for b in first) < cfg.init_tokens:
            batch = next(batches, None)
            if batch is None:
                break
            first.append(batch)
        if not first:
            raise MlsaeError("the activation source produced no data")
        x = torch.cat([b.acts for b in first]).to(self.device, torch.float32)
        check_finite(x, "the first batches", self.layers)
        started = self.coder.initialise(x)
        starts = range(0, len(x), self.micro)
        with torch.no_grad():  # micro-batch by micro-batch, so memory stays that of a step
            chunks = [(self.coder(x[i : i + self.micro]).fvu.cpu(), len(x[i : i + self.micro]))
                      for i in tqdm(starts, desc="initial FVU", unit="batch", leave=False, disable=len(starts) < 2)]
        fvu = sum(f * n for f, n in chunks) / len(x)
        self.init_info = {
            "tokens": int(x.shape[0]),
            "b_pre": cfg.b_pre_init,
            "transforms": self.coder.transform.describe(),
            "fvu": float(fvu.mean()),
            "fvu_per_layer": [round(float(v), 5) for v in fvu],
            **started,
        }
        del x
        line = {"step": 0, "tokens": 0, "step_tokens": 0, "loss": float(fvu.mean()), "fvu": float(fvu.mean()), "auxk": 0.0,
                "fvu_per_layer": self.init_info["fvu_per_layer"], "dead_fraction": 0.0, "tokens_per_s": 0.0}
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        save_coder(self.coder, self.out, self.model_name, self.fingerprint, self._run_meta())
        tqdm.write(
            f"initial FVU {float(fvu.mean()):.3f} (layers {float(fvu.min()):.3f} to {float(fvu.max()):.3f}): b_pre started at "
            f"{B_PRE_START[cfg.b_pre_init]}, transforms [{', '.join(self.init_info['transforms'])}], "
            f"on the first {self.init_info['tokens']:,} tokens"
        )
        if "encoder_scale" in started:
            tqdm.write(
                f"encoder scaled by {started['encoder_scale']:.4g} (c = {started['init_gain']}) so the first reconstruction has "
                f"the input's scale: FVU {started['fvu_before_scaling']:.3f} before, {started['fvu_after_scaling']:.3f} after "
                f"(in the coder's space)"
            )
        return first

    def _step(self, micro_batches: list[ActivationBatch]) -> dict:
        cfg, coder = self.cfg, self.coder
        step_tokens = sum(len(b) for b in micro_batches)
        dead = self.state.tokens_since_fired >= cfg.dead_tokens if cfg.aux_coef > 0 else None  # AuxK off: no e_hat
        # Updated on a copy so that an interruption mid-step leaves the state of the last full step.
        since_fired = self.state.tokens_since_fired.clone()
        totals = {"loss": 0.0, "fvu": torch.zeros(len(self.layers)), "auxk": torch.zeros(len(self.layers))}
        for batch in micro_batches:
            x = batch.acts.to(self.device, torch.float32)
            check_finite(x, f"step {self.state.step}", self.layers)
            out = coder(x, dead)
            if not torch.isfinite(out.loss):
                raise MlsaeError(f"step {self.state.step}: the loss became {out.loss.item()}; the last good checkpoint is kept")
            weight = len(batch) / step_tokens
            (out.loss * weight).backward()
            totals["loss"] += out.loss.item() * weight
            totals["fvu"] += out.fvu.detach().cpu() * weight
            totals["auxk"] += out.auxk.detach().cpu() * weight
            fired = coder.fired(out.top_acts.detach(), out.top_idx)
            # A latent's clock counts tokens: it resets where the latent fired in this micro-batch.
            since_fired += len(batch)
            since_fired[fired] = 0
        with interrupts_deferred():  # weights and counters change together, or not at all
            coder.remove_parallel_grads()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            coder.normalize_decoder()
            self.state.step += 1
            self.state.tokens += step_tokens
            self.state.tokens_since_fired = since_fired
        dead_now = since_fired >= cfg.dead_tokens
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "step_tokens": step_tokens,
            "loss": totals["loss"],
            "fvu": float(totals["fvu"].mean()),
            "auxk": float(totals["auxk"].mean()),
            "fvu_per_layer": [round(float(v), 5) for v in totals["fvu"]],
            "dead_fraction": float(dead_now.float().mean()),
        }


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a blank or torn line (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


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


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done, then raise
    it: a checkpoint saved on interrupt never pairs new weights with old counters."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _start_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise MlsaeError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="mlsae", config=to_dict(cfg), name=Path(cfg.out).name)


def train(cfg: TrainConfig, model: Optional[ResidualModel] = None) -> dict:
    """Train a sparse coder as ``cfg`` says; returns the last step's metrics."""
    trainer = Trainer(cfg, model)
    result = trainer.train()
    save_json(trainer.out / "train_summary.json", result)
    return result
