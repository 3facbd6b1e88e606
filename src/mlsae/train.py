"""Training: a :class:`Trainer` per sparse coder, and :func:`fit`, the loop that feeds one
activation stream to one trainer (``mlsae train``) or several in lockstep (``mlsae sweep``).

A trainer holds its coder, optimizer and counters (losses, dead-latent tracking, decoder
normalisation) and hands what to write to its run folder (:class:`mlsae.runs.RunFolder`):
``config.json`` (the coder's settings, the model it reads and the training settings),
``sae.safetensors`` (the final coder), ``metrics.jsonl`` and ``checkpoint/`` (coder, optimizer
and counters, for an exact ``--resume``). The batches come from an
:class:`mlsae.stream.ActivationStream`; trainers sharing one see exactly what each would alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .activations import ActivationBatch, check_finite
from .config import SAEConfig, SweepConfig, TrainConfig, save_json, subset, to_dict, validate
from .dist import World, device_for, world
from .errors import MlsaeError
from .lens import check_lens_for, load_lens
from .model import ResidualModel, resolve_device
from .placement import placement_for
from .runs import RunFolder
from .sae import ARRANGEMENTS, LEGACY_SAE_SETTINGS, SparseCoder, load_coder, read_coder_config
from .stream import ActivationStream


RESUMABLE_CHANGES = frozenset(
    {"tokens", "checkpoint_tokens", "wandb", "resume", "overwrite", "device", "out", "cache", "model", "verify_cache", "prefetch",
     "distribute_layers", "shard_latents"}
)
"""Settings a resumed run may change: they do not alter what it computes (the cache and model
are checked by content: the same model fingerprint and layers; every placement over the
processes trains the same coder on the same batches)."""

B_PRE_START = {"geometric_median": "the geometric median", "mean": "the mean", "zero": "zero"}


@dataclass
class TrainState:
    """Everything besides the weights and optimizer that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    tokens_since_fired: Optional[torch.Tensor] = None  # [latent_shape] int64


def adam(params, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel per step on the CPU and CUDA (7x faster than the per-tensor
    loop on 2 CPU cores for a 33M-weight coder, where the update is a fifth of the step)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


class Trainer:
    """One sparse coder in training: its optimizer and counters, stepped on the batches
    :func:`fit` gives it, and its run folder. ``stream`` is shared when several coders train on
    one stream (a sweep); without one, the trainer opens its own from ``cfg``. Every setting is
    checked before anything is written."""

    def __init__(self, cfg: TrainConfig, model: Optional[ResidualModel] = None, stream: Optional[ActivationStream] = None,
                 prepare_folder: bool = True):
        self.out = Path(cfg.out)
        self.world: World = world(resolve_device(cfg.device))
        cfg = dataclasses.replace(cfg, device=device_for(cfg.device, self.world))  # under torchrun: this rank's GPU
        self.device = resolve_device(cfg.device)
        self.cfg = cfg
        self._check_settings()
        self.stream = stream or ActivationStream(cfg, model, self.world)
        self.cfg = cfg = self.stream.settle(cfg)
        self.layers = self.stream.layers
        self.d_model = self.stream.d_model
        self.model_name = self.stream.model_name
        self.fingerprint = self.stream.fingerprint
        if cfg.arch not in ARRANGEMENTS:
            raise MlsaeError(f"arch {cfg.arch!r}: expected one of {', '.join(ARRANGEMENTS)}")
        whole = ARRANGEMENTS[cfg.arch](subset(cfg, SAEConfig), self.d_model, self.layers, cfg.seed)
        self.placement = placement_for(cfg, self.world, self.layers, whole.latent_space, whole.n_latents)
        self.lens_info = self._attach_lens(whole) if cfg.lens else None
        self.coder: SparseCoder = self.placement.part(whole).to(self.device)  # this process's part (all of it, by default)
        latent_shape = whole.latent_shape()  # the dead-latent clocks are the whole coder's on every process
        del whole
        self._check_memory()
        self.optimizer = adam(self.coder.parameters(), cfg.lr, cfg.adam_eps, self.device)
        self.state = TrainState(tokens_since_fired=torch.zeros(latent_shape, dtype=torch.long, device=self.device))
        self.init_info: Optional[dict] = None  # how the coder was started; saved in config.json
        self.finished = False
        self.label = ""  # names the run in messages when several train at once
        self.folder = RunFolder(self.out, self.model_name, self.fingerprint, writes=self.world.writes)
        if prepare_folder:  # a sweep builds every trainer first, so a refused one leaves no folder behind
            self.prepare_folder()

    @property
    def cache(self):
        return self.stream.cache

    @property
    def model(self) -> Optional[ResidualModel]:
        return self.stream.model

    def _attach_lens(self, coder: SparseCoder) -> dict:
        """Load ``--lens``, refuse one made for another model, and give the coder its translators."""
        lens, meta = load_lens(self.cfg.lens)
        check_lens_for(lens, meta, f"--lens {self.cfg.lens}", self.model_name, self.fingerprint, self.stream.n_blocks)
        coder.set_lens(lens)
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
        n = self.world.size
        for flag, value in (("--tokens-per-step", c.tokens_per_step), ("--micro-batch-tokens", micro), ("--tokens", c.tokens)):
            if value % n:
                raise MlsaeError(f"{flag} {value} is not a multiple of the world size {n}: each of the {n} processes takes an "
                                 f"equal share of every batch")
        self.micro = micro  # tokens of a micro-batch, over all ranks; each rank codes micro / world size of them

    def _check_memory(self) -> None:
        """Refuse a micro-batch whose encoder pre-activations alone cannot fit, before any work.

        The TopK encoder holds ``[vectors, n_latents]`` fp32 pre-activations (and about as much
        again in the step's temporaries); an MLSAE codes every layer of a token at once.
        """
        per_token = len(self.layers) if self.coder.latent_space == "shared" else 1
        micro = self.micro // self.placement.rows_scale  # the rows this process codes at once (1/N of them when replicated)
        latents = self.placement.latents_here(self.coder.n_latents)
        need = 2 * 4 * micro * per_token * latents
        if self.device.type == "cuda":
            have = torch.cuda.get_device_properties(self.device).total_memory
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > 0.8 * have:
            fits = self.micro // micro * 2 ** int(math.log2(max(1, 0.8 * have / (2 * 4 * per_token * latents))))
            raise MlsaeError(
                f"--micro-batch-tokens {self.micro} needs about {need / 2**30:.0f} GiB for the encoder's pre-activations "
                f"({micro} tokens x {per_token} layers x {latents:,} latents), more than this "
                f"{self.device.type} memory ({have / 2**30:.0f} GiB) allows: lower --micro-batch-tokens (to {fits} or less)"
            )

    def _run_meta(self) -> dict:
        meta = {
            "train": to_dict(self.cfg),
            "transforms": self.coder.transform.describe(),
            "progress": {"step": self.state.step, "tokens": self.state.tokens},
            "world_size": self.world.size,
            "finished": self.finished,
        }
        if self.init_info is not None:
            meta["init"] = self.init_info
        if self.lens_info is not None:
            meta["lens"] = self.lens_info
        return meta

    def prepare_folder(self) -> None:
        """Start the run folder (or, with ``--resume``, load its newest checkpoint)."""
        self.folder.check_free(self.cfg.resume, self.cfg.overwrite)
        self.world.barrier()  # every rank has looked before rank 0 writes
        if self.cfg.resume:
            self._resume()
            return
        if self.cfg.overwrite and self.out.exists():
            self.folder.clear()
        self.save()

    def save(self) -> None:
        """The whole coder and the run's metadata, in the run folder (assembled on rank 0)."""
        self.folder.save(self.placement.whole(self.coder), self._run_meta())

    # ---------------------------------------------------------------------------------------
    # Checkpoints: written to checkpoint.tmp, then swapped in; the previous one survives a crash.

    def save_checkpoint(self) -> None:
        coder = self.placement.whole(self.coder)
        opt = self.placement.whole_optimizer(self.coder, self.optimizer, coder)
        self.folder.save_checkpoint(coder, self._run_meta(), opt, self.state.step, self.state.tokens, self.state.tokens_since_fired)

    def _resume(self) -> None:
        folder = self.folder.latest_checkpoint()
        saved = read_coder_config(folder)
        if saved["sae"]["arch"] != self.cfg.arch:
            raise MlsaeError(f"--resume: {self.out} holds a {saved['sae']['arch']} run, not {self.cfg.arch}")
        coder, _ = load_coder(folder, model_fingerprint=self.fingerprint, arch=self.cfg.arch)
        if saved["layers"] != self.layers:
            raise MlsaeError(f"--resume: the run in {self.out} was trained on layers {saved['layers']}, not {self.layers}")
        trained_on = saved.get("world_size", 1)
        if trained_on != self.world.size:
            raise MlsaeError(
                f"--resume: the run in {self.out} was trained by {trained_on} process(es), not {self.world.size}: resume it with "
                f"the same world size (each process's share of the data depends on it)"
            )
        self._check_unchanged({**LEGACY_SAE_SETTINGS, **saved["sae"], **saved.get("train", {})})
        recorded = (saved.get("lens") or {}).get("sha256")
        if self.lens_info is not None and recorded != self.lens_info["sha256"]:
            raise MlsaeError(
                f"--lens {self.cfg.lens} is not the lens this run was trained with (sha256 {str(recorded)[:12]} recorded, "
                f"{self.lens_info['sha256'][:12]} now): resume with that lens"
            )
        self.coder.load_state_dict(self.placement.part(coder).state_dict())
        opt, step, tokens, clocks = checkpoint.load_trainer(folder, self.device)
        self.optimizer.load_state_dict(self.placement.part_optimizer(coder, self.coder, opt))
        self.state = TrainState(step, tokens, clocks)
        self.init_info = saved.get("init")
        self.folder.drop_metrics_after(self.state.step)

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

    def train(self) -> dict:
        """Train on this trainer's own stream; the last step's metrics."""
        return fit([self])[0]

    def finish(self) -> None:
        """The last checkpoint and the final coder, recorded as finished."""
        self.save_checkpoint()
        self.finished = True
        self.save()

    def initialise(self, first: list[ActivationBatch]) -> None:
        """Fit the frozen input transforms and start b_pre on the first batches (``init_tokens``
        tokens, which training then uses as usual); log the initial FVU as step 0."""
        cfg = self.cfg
        x = torch.cat([b.acts for b in first]).to(self.device, torch.float32)
        check_finite(x, "the first batches", self.layers)
        x = self.placement.layers_of(self.world.interleave_rows(x))  # every rank fits the same transforms on the whole first batches
        started = self.coder.initialise(x)
        starts = range(0, len(x), self.micro)
        fvu = torch.zeros(len(self.coder.layers), dtype=torch.float64)
        with torch.no_grad():  # micro-batch by micro-batch, so memory stays that of a step; each process its rows
            for i in tqdm(starts, desc="initial FVU", unit="batch", leave=False, disable=len(starts) < 2 or not self.world.writes):
                chunk = x[i : i + self.micro]
                fvu += self.coder(self.placement.own_rows(chunk), total=self.placement.total).fvu.double().cpu() * len(chunk)
        fvu = self.placement.step_sum(self.placement.spread(fvu / len(x))).float()
        self.init_info = {
            "tokens": int(x.shape[0]),
            "b_pre": cfg.b_pre_init,
            "transforms": self.coder.transform.describe(),
            "fvu": float(fvu.mean()),
            "fvu_per_layer": [round(float(v), 5) for v in fvu],
            **started,
        }
        del x
        self.folder.log({"step": 0, "tokens": 0, "step_tokens": 0, "loss": float(fvu.mean()), "fvu": float(fvu.mean()),
                         "auxk": 0.0, "fvu_per_layer": self.init_info["fvu_per_layer"], "dead_fraction": 0.0, "tokens_per_s": 0.0})
        self.save()
        who = f"{self.label}: " if self.label else ""
        say = tqdm.write if self.world.writes else (lambda _: None)
        say(
            f"{who}initial FVU {float(fvu.mean()):.3f} (layers {float(fvu.min()):.3f} to {float(fvu.max()):.3f}): b_pre started at "
            f"{B_PRE_START[cfg.b_pre_init]}, transforms [{', '.join(self.init_info['transforms'])}], "
            f"on the first {self.init_info['tokens']:,} tokens"
        )
        if "encoder_scale" in started:
            say(
                f"{who}encoder scaled by {started['encoder_scale']:.4g} (c = {started['init_gain']}) so the first reconstruction "
                f"has the input's scale: FVU {started['fvu_before_scaling']:.3f} before, {started['fvu_after_scaling']:.3f} after "
                f"(in the coder's space)"
            )

    def _step(self, micro_batches: list[ActivationBatch]) -> dict:
        cfg, coder, w, place = self.cfg, self.coder, self.world, self.placement
        step_tokens = sum(len(b) for b in micro_batches) * w.size  # over all ranks
        dead = self.state.tokens_since_fired >= cfg.dead_tokens if cfg.aux_coef > 0 else None  # AuxK off: no e_hat
        # Updated on a copy so that an interruption mid-step leaves the state of the last full step.
        since_fired = self.state.tokens_since_fired.clone()
        n = len(coder.layers)
        totals = {"loss": 0.0, "fvu": torch.zeros(n, dtype=torch.float64), "auxk": torch.zeros(n, dtype=torch.float64)}
        for batch in micro_batches:
            x = batch.acts.to(self.device, torch.float32)
            check_finite(x, f"step {self.state.step}", self.layers)
            x = place.inputs(x)  # the rows (and layers) this process's part codes
            with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.coder_dtype == "bfloat16"):
                out = coder(x, place.dead_part(dead), place.total)
            if not torch.isfinite(out.loss):
                raise MlsaeError(f"step {self.state.step}: the loss became {out.loss.item()}; the last good checkpoint is kept")
            weight = len(x) * place.rows_scale / step_tokens  # this micro-batch's share of the step
            (out.loss * weight * place.loss_scale).backward()
            totals["loss"] += out.loss.item() * weight * place.loss_scale
            totals["fvu"] += out.fvu.detach().double().cpu() * weight
            totals["auxk"] += out.auxk.detach().double().cpu() * weight
            fired = place.fired(coder.fired(out.top_acts.detach(), out.top_idx))  # the whole coder's, on every rank
            # A latent's clock counts tokens: it resets where the latent fired in this micro-batch.
            since_fired += len(batch) * w.size
            since_fired[fired] = 0
        # each process holds its share (of the rows, or of the layers): the whole batch's numbers
        shares = place.step_sum(torch.cat([torch.tensor([totals["loss"]], dtype=torch.float64),
                                           place.spread(totals["fvu"]), place.spread(totals["auxk"])]))
        L = len(self.layers)
        totals = {"loss": float(shares[0]), "fvu": shares[1 : 1 + L].float(), "auxk": shares[1 + L :].float()}
        place.sync_grads(coder.parameters())
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


def fit(trainers: list[Trainer]) -> list[dict]:
    """Train ``trainers`` (sharing one stream, one step size and one token budget) in lockstep on
    the stream's batches; returns each one's last step's metrics. Each trainer sees the batches it
    would see alone; one resumed further than the others skips the steps it has already taken.
    Ctrl-C saves every trainer's checkpoint, then stops."""
    lead = trainers[0]
    cfg, micro, w = lead.cfg, lead.micro, lead.world
    micro_per_step = cfg.tokens_per_step // micro
    position = min(t.state.tokens for t in trainers)  # tokens over all ranks
    w.same_everywhere(position, "the tokens trained so far")
    batches = lead.stream.batches(micro // w.size, skip_rows=position // w.size)  # this rank's share
    wandb_runs = [_start_wandb(t.cfg) if t.cfg.wandb and w.writes else None for t in trainers]
    desc = f"train {cfg.arch}" if len(trainers) == 1 else f"sweep of {len(trainers)}"
    bar = tqdm(total=cfg.tokens, initial=position, unit="tok", desc=desc, smoothing=0.05, disable=not w.writes)
    next_checkpoint = [(t.state.tokens // t.cfg.checkpoint_tokens + 1) * t.cfg.checkpoint_tokens for t in trainers]
    started, start_tokens = time.perf_counter(), position
    last: list[dict] = [{} for _ in trainers]
    try:
        fresh = [t for t in trainers if t.state.step == 0]
        if fresh:  # a fresh start: fit the transforms and b_pre, then train on the same batches
            first = _first_batches(batches, -(-cfg.init_tokens // micro))
            for t in fresh:
                t.initialise(first)
            batches = itertools.chain(first, batches)
        while position < cfg.tokens:
            # the last step is cut to what was asked: never more tokens than --tokens
            remaining = cfg.tokens - position
            micro_batches = list(itertools.islice(batches, min(micro_per_step, -(-remaining // micro))))
            if not micro_batches:
                raise MlsaeError("the activation source produced no data")
            mine = remaining // w.size  # --tokens is a multiple of the world size
            if sum(len(b) for b in micro_batches) > mine:
                micro_batches[-1] = micro_batches[-1].slice(0, mine - sum(len(b) for b in micro_batches[:-1]))
            for i, t in enumerate(trainers):
                if t.state.tokens > position:  # resumed from a later checkpoint: it took this step already
                    continue
                last[i] = t._step(micro_batches)
                last[i]["tokens_per_s"] = (t.state.tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
                t.folder.log(last[i])
                if wandb_runs[i] is not None:
                    wandb_runs[i].log(last[i], step=t.state.step)
            step_tokens = sum(len(b) for b in micro_batches) * w.size
            position += step_tokens
            bar.update(step_tokens)
            bar.set_postfix(**_postfix(last))
            for i, t in enumerate(trainers):
                if t.state.tokens >= next_checkpoint[i]:
                    t.save_checkpoint()
                    next_checkpoint[i] += t.cfg.checkpoint_tokens
    except KeyboardInterrupt:
        bar.close()
        for t in trainers:
            t.save_checkpoint()
        if w.writes:
            print(f"\ninterrupted: saved {'a checkpoint' if len(trainers) == 1 else 'checkpoints'} at {position:,} tokens; "
                  f"continue with --resume")
        raise
    finally:
        bar.close()
        for i, t in enumerate(trainers):
            t.folder.close()
            if wandb_runs[i] is not None:
                wandb_runs[i].finish()
    for t in trainers:
        t.finish()
    return last


def _first_batches(batches: Iterator[ActivationBatch], count: int) -> list[ActivationBatch]:
    """The first ``count`` micro-batches (the transforms and b_pre are fitted on them)."""
    first = list(itertools.islice(batches, count))
    if not first:
        raise MlsaeError("the activation source produced no data")
    return first


def _postfix(last: list[dict]) -> dict:
    """The progress bar's numbers: one run's loss, FVU and dead share, or a sweep's range of them."""
    done = [m for m in last if m]
    if not done:
        return {}
    if len(last) == 1:
        m = done[0]
        return {"loss": f"{m['loss']:.4f}", "fvu": f"{m['fvu']:.4f}", "dead": f"{100 * m['dead_fraction']:.1f}%"}
    fvu = [m["fvu"] for m in done]
    return {"fvu": f"{min(fvu):.4f}-{max(fvu):.4f}", "dead_max": f"{100 * max(m['dead_fraction'] for m in done):.1f}%"}


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


def sweep_runs(cfg: SweepConfig) -> dict[str, TrainConfig]:
    """One run's settings per combination of the swept values, named by them, in ``cfg.out``."""
    for name in SweepConfig.SWEPT:
        values = getattr(cfg, name)
        if len(set(values)) != len(values):
            raise MlsaeError(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: each value once")
    if cfg.n_latents is not None and len(cfg.expansion_factor) > 1:
        raise MlsaeError("--n-latents fixes the latents of every run: give it or several --expansion-factor values, not both")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    runs = {}
    for arch, factor, k, lr in itertools.product(cfg.arch, cfg.expansion_factor, cfg.k, cfg.lr):
        size = f"n{cfg.n_latents}" if cfg.n_latents is not None else f"R{factor}"
        name = f"{arch}-{size}-k{k}-lr{lr:g}"
        runs[name] = TrainConfig(**{**base, "arch": arch, "expansion_factor": factor, "k": k, "lr": lr,
                                    "out": str(Path(cfg.out) / name)})
    for run in runs.values():
        validate(run)
    return runs


def sweep(cfg: SweepConfig, model: Optional[ResidualModel] = None) -> dict[str, dict]:
    """Train every combination of ``cfg``'s swept values from ONE activation stream (the language
    model runs once for all); each run gets its own folder, the same as if trained alone with
    ``mlsae train`` and its settings. Returns each run's last step's metrics, by run name."""
    runs = sweep_runs(cfg)
    for run in runs.values():  # every folder checked before the model loads
        RunFolder(run.out, "", "").check_free(run.resume, run.overwrite)
    first = next(iter(runs.values()))
    w = world(resolve_device(first.device))
    stream = ActivationStream(dataclasses.replace(first, device=device_for(first.device, w)), model, w)
    trainers = [Trainer(run, stream=stream, prepare_folder=False) for run in runs.values()]
    for name, trainer in zip(runs, trainers):  # every run's settings checked: now write
        trainer.label = name
        trainer.prepare_folder()
    save_json(Path(cfg.out) / "sweep.json", {"sweep": to_dict(cfg), "runs": list(runs)})
    results = fit(trainers)
    return dict(zip(runs, results))
