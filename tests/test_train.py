import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.checkpoint import read_progress
from mlsae.config import TrainConfig
from mlsae.errors import MlsaeError
from mlsae.text import pack_windows
from mlsae.train import Trainer, train

TEXT = [f"Sample {i}: the cat sat on the mat while {i * 7} dogs barked loudly." for i in range(300)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=3, seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("cache")
    write_cache(tiny, pack_windows(TEXT, tiny.tokenizer, 32), folder / "c", tokens=1500, shard_tokens=400)
    return folder / "c"


def cfg(out, cache=None, **kw):
    base = dict(
        out=str(out), cache=str(cache) if cache else None, data="unused", expansion_factor=2, k=4,
        tokens=960, tokens_per_step=64, micro_batch_tokens=32, lr=3e-3, checkpoint_tokens=320,
        device="cpu", shuffle_buffer_mb=1, ctx=32, decoder_impl="sparse", init_tokens=256,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(folder):
    return load_file(str(folder / "sae.safetensors"))


@pytest.mark.parametrize("arch", ["mlsae", "per-layer"])
def test_training_from_cache_lowers_the_loss_and_writes_a_run(tmp_path, cache_dir, arch):
    result = train(cfg(tmp_path / "run", cache_dir, arch=arch, tokens=1280))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 + 1280 // 64 and lines[-1]["tokens"] == 1280 == result["tokens"]
    assert lines[0]["step"] == 0 and lines[0]["tokens"] == 0  # the initial FVU, before any step
    assert np.mean([l["fvu"] for l in lines[-3:]]) < 0.8 * np.mean([l["fvu"] for l in lines[:3]])
    assert len(lines[0]["fvu_per_layer"]) == 3
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sae"]["arch"] == arch and saved["layers"] == [0, 1, 2] and saved["train"]["tokens"] == 1280
    w = weights(tmp_path / "run")
    dec = [v for k, v in w.items() if k.endswith("W_dec")]
    for d in dec:
        torch.testing.assert_close(d.norm(dim=1), torch.ones(d.shape[0]))


def test_bf16_autocast_trains_the_coder_as_fp32_does_to_bf16_precision(tmp_path, cache_dir):
    """--coder-dtype bfloat16: the encoder's matmuls in bf16, the weights and losses fp32; the run
    learns as the fp32 one does (not bit-identically: the setting is used)."""
    a = train(cfg(tmp_path / "fp32", cache_dir, tokens=1280))
    b = train(cfg(tmp_path / "bf16", cache_dir, tokens=1280, coder_dtype="bfloat16"))
    assert abs(a["fvu"] - b["fvu"]) < 0.03 and b["fvu"] < 0.8
    wa, wb = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in wb.values() if v.is_floating_point())
    assert not torch.equal(wa["sae.W_enc"], wb["sae.W_enc"])
    assert (wa["sae.W_dec"] - wb["sae.W_dec"]).norm() / wa["sae.W_dec"].norm() < 0.2


def test_a_run_saved_with_centring_loads_and_evaluates_to_the_same_numbers(tmp_path, cache_dir):
    from mlsae.activations import ActivationCache
    from mlsae.evaluate import evaluate
    from mlsae.sae import fvu_per_layer, load_coder

    trainer = Trainer(cfg(tmp_path / "run", cache_dir, tokens=320))
    trainer.train()
    loaded, meta = load_coder(tmp_path / "run")
    assert meta["transforms"] == ["standardize", "center_layers"] and meta["init"]["b_pre"] == "geometric_median"
    torch.testing.assert_close(loaded.transform.steps[1].mean, trainer.coder.transform.steps[1].mean)
    x = torch.cat([b.acts for b in ActivationCache(cache_dir).batches(500, shuffle=False)])
    with torch.no_grad():
        x_hat = loaded(x).x_hat
        torch.testing.assert_close(x_hat, trainer.coder(x).x_hat)
    table = evaluate(tmp_path / "run", str(cache_dir), tokens=len(x), downstream_tokens=0, device="cpu", progress=False)
    np.testing.assert_allclose(table.column("fvu").to_pylist()[:-1], fvu_per_layer(x.double(), x_hat.double()).numpy(), rtol=1e-4)


def test_training_live_from_the_model(tmp_path, tiny):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    result = train(cfg(tmp_path / "run", data=str(tmp_path / "t.jsonl"), tokens=320), model=tiny)
    assert result["tokens"] == 320 and result["fvu"] < 1.5


def test_resume_is_bit_identical_and_keeps_the_frozen_means(tmp_path, cache_dir, monkeypatch):
    from mlsae.sae import SparseCoder

    train(cfg(tmp_path / "full", cache_dir))
    train(cfg(tmp_path / "half", cache_dir, tokens=448))  # stops mid-epoch, between checkpoints
    fitted = weights(tmp_path / "half" / "checkpoint")["transform.steps.1.mean"]
    assert fitted.abs().sum() > 0

    def refit(*args):
        raise AssertionError("a resumed run must not fit its transforms or b_pre again")

    monkeypatch.setattr(SparseCoder, "initialise", refit)
    train(cfg(tmp_path / "half", cache_dir, resume=True))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(b["transform.steps.1.mean"], fitted)
    metrics = [json.loads(l) for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(0, 16))


def test_resume_after_ctrl_c_is_bit_identical(tmp_path, cache_dir, monkeypatch):
    train(cfg(tmp_path / "full", cache_dir))
    trainer = Trainer(cfg(tmp_path / "run", cache_dir))
    real_step = trainer._step

    def interrupt_at_step_5(batches):
        if trainer.state.step == 5:
            raise KeyboardInterrupt
        return real_step(batches)

    monkeypatch.setattr(trainer, "_step", interrupt_at_step_5)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # a line a crash could leave past the checkpoint
        f.write(json.dumps({"step": 99}) + "\n")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state = read_progress(tmp_path / "run" / "checkpoint")
    assert state["step"] == 5 and state["tokens"] == 320
    # an unfinished run is refused by eval and analyze, or opened at its checkpoint on request
    from mlsae.runs import open_run

    with pytest.raises(MlsaeError, match=r"is an unfinished run \(320 of 960 tokens trained\): continue it with `mlsae train --resume`"):
        open_run(tmp_path / "run")
    partial = open_run(tmp_path / "run", allow_unfinished=True)
    checkpoint = weights(tmp_path / "run" / "checkpoint")
    assert all(torch.equal(v, checkpoint[k]) for k, v in partial.coder.state_dict().items())
    train(cfg(tmp_path / "run", cache_dir, resume=True))
    assert open_run(tmp_path / "run").meta["finished"] is True
    a, b = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 16))


def test_ctrl_c_during_the_optimizer_step_waits_for_the_counters(tmp_path, cache_dir, monkeypatch):
    import os
    import signal

    train(cfg(tmp_path / "full", cache_dir))
    trainer = Trainer(cfg(tmp_path / "run", cache_dir))
    real = trainer.optimizer.step

    def step_then_ctrl_c(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.state.step == 4:  # the signal lands after the weights changed, before the counters did
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer.optimizer, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state = read_progress(tmp_path / "run" / "checkpoint")
    assert state["step"] == 5 and state["tokens"] == 320  # the step was completed, then saved
    monkeypatch.undo()
    train(cfg(tmp_path / "run", cache_dir, resume=True))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_setting_that_changes_the_result(tmp_path, cache_dir):
    train(cfg(tmp_path / "run", cache_dir, tokens=128))
    for name, value, flag in (("lr", 1e-2, "--lr"), ("seed", 3, "--seed"), ("tokens_per_step", 32, "--tokens-per-step"),
                              ("center_layers", False, "--center-layers")):
        with pytest.raises(MlsaeError, match=f"--resume: {flag} is .* but the run in .* was trained with"):
            train(cfg(tmp_path / "run", cache_dir, tokens=256, resume=True, **{name: value}))
    # the total tokens and the checkpoint interval may change
    assert train(cfg(tmp_path / "run", cache_dir, tokens=256, checkpoint_tokens=64, resume=True))["tokens"] == 256


def test_dead_latents_are_counted_in_tokens(tmp_path, cache_dir):
    trainer = Trainer(cfg(tmp_path / "run", cache_dir, dead_tokens=100, expansion_factor=8, k=1))
    batch = next(iter(trainer.cache.batches(32, shuffle=False)))
    trainer.coder.initialise(batch.acts)
    fired_before = trainer.state.tokens_since_fired.clone()
    trainer._step([batch, batch])
    since = trainer.state.tokens_since_fired
    # two micro-batches of 32 tokens (x 3 layers): a latent that never fired has waited 64 tokens
    with torch.no_grad():
        out = trainer.coder(batch.acts)
    never = since == 64
    assert (fired_before == 0).all() and never.any() and (since <= 64).all()
    assert not never[out.top_idx.flatten()].all()
    trainer._step([batch])
    assert not (trainer.state.tokens_since_fired >= 100).any()  # 96 tokens at most: none dead yet
    trainer._step([batch])  # 128 >= 100 tokens without firing: dead
    since = trainer.state.tokens_since_fired
    dead = since >= 100
    assert dead.any() and (since[dead] == 128).all()
    with torch.no_grad():
        out = trainer.coder(batch.acts)
    assert (since[out.top_idx[out.top_acts > 0]] == 0).all()  # fired in the last micro-batch


def test_refuses_an_existing_run_and_bad_settings(tmp_path, cache_dir):
    train(cfg(tmp_path / "run", cache_dir, tokens=64))
    with pytest.raises(MlsaeError, match="already holds a run; pass --resume to continue it or --overwrite"):
        train(cfg(tmp_path / "run", cache_dir, tokens=64))
    with pytest.raises(MlsaeError, match="holds a mlsae run, not per-layer"):
        train(cfg(tmp_path / "run", cache_dir, arch="per-layer", resume=True))
    train(cfg(tmp_path / "run", cache_dir, tokens=64, arch="per-layer", overwrite=True))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sae"]["arch"] == "per-layer"
    with pytest.raises(MlsaeError, match="holds no checkpoint to resume from"):
        train(cfg(tmp_path / "new", cache_dir, resume=True))
    with pytest.raises(MlsaeError, match="is not a multiple of micro_batch_tokens"):
        train(cfg(tmp_path / "x", cache_dir, tokens_per_step=48, micro_batch_tokens=32))
    with pytest.raises(MlsaeError, match=r"holds layers \[.*\], not layer 7: capture the layers the run needs"):
        train(cfg(tmp_path / "y", cache_dir, layers=[0, 7]))
    assert not (tmp_path / "y").exists()


def test_nan_activations_stop_and_keep_the_last_checkpoint(tmp_path, cache_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = manifest["shards"][-1]
    arr = np.memmap(bad / shard["acts"], dtype=np.float32, mode="r+", shape=(shard["n"], 3, 32))
    arr[:, 2, 0] = np.nan
    arr.flush()
    train(cfg(tmp_path / "run", cache_dir, tokens=320))  # a good run with a checkpoint at 320 tokens
    with pytest.raises(MlsaeError, match=r"step \d+: NaN or inf activations at layer 2"):
        train(cfg(tmp_path / "run", bad, checkpoint_tokens=64, tokens=1500, resume=True, verify_cache=False))
    state = read_progress(tmp_path / "run" / "checkpoint")
    assert state["tokens"] >= 320
    load_file(str(tmp_path / "run" / "checkpoint" / "sae.safetensors"))  # intact


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, cache_dir, monkeypatch):
    import errno

    import mlsae.checkpoint

    trainer = Trainer(cfg(tmp_path / "run", cache_dir, tokens=128))
    trainer.train()
    before = weights(tmp_path / "run" / "checkpoint")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlsae.checkpoint, "save_file", full)
    with torch.no_grad():
        for p in trainer.coder.parameters():
            p.add_(1.0)
    with pytest.raises(MlsaeError, match="could not write a checkpoint in .*: no space left on the device; the previous checkpoint is kept"):
        trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    after = weights(tmp_path / "run" / "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    resumed = Trainer(cfg(tmp_path / "run", cache_dir, tokens=256, resume=True))
    assert resumed.state.tokens == 128


def test_a_corrupted_checkpoint_is_named_and_the_previous_one_used(tmp_path, cache_dir):
    import shutil

    train(cfg(tmp_path / "run", cache_dir, tokens=128, checkpoint_tokens=64))
    ck = tmp_path / "run" / "checkpoint"
    shutil.copytree(ck, tmp_path / "run" / "checkpoint.old")  # as if a crash came mid-swap
    data = bytearray((ck / "trainer.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte
    (ck / "trainer.safetensors").write_bytes(bytes(data))
    resumed = Trainer(cfg(tmp_path / "run", cache_dir, tokens=256, resume=True))
    assert resumed.state.tokens == 128  # from checkpoint.old
    shutil.rmtree(tmp_path / "run" / "checkpoint.old")
    with pytest.raises(MlsaeError, match=r"no usable checkpoint in .*trainer.safetensors is corrupted or truncated"):
        Trainer(cfg(tmp_path / "run", cache_dir, tokens=256, resume=True))
    (ck / "sae.safetensors").write_bytes((ck / "sae.safetensors").read_bytes()[:100])  # truncated
    with pytest.raises(MlsaeError, match="no usable checkpoint"):
        Trainer(cfg(tmp_path / "run", cache_dir, tokens=256, resume=True))


def test_no_pickle_in_a_checkpoint(tmp_path, cache_dir):
    train(cfg(tmp_path / "run", cache_dir, tokens=64))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert names == ["checksums.json", "config.json", "sae.safetensors", "trainer.json", "trainer.safetensors"]


def planted_model():
    """A tiny Llama whose blocks each add a large constant to one dimension of the residual
    stream: massive, nearly constant dimensions that differ from layer to layer."""
    import transformers

    from conftest import char_tokenizer, tiny_config
    from mlsae.model import ResidualModel

    torch.manual_seed(0)
    config = tiny_config("llama", n_layers=3)
    config.mlp_bias = True
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for l, block in enumerate(hf.model.layers):
            block.mlp.down_proj.bias.zero_()
            block.mlp.down_proj.bias[3 + 5 * l] = 60.0 * (l + 1)
    return ResidualModel(hf.float().eval(), char_tokenizer(), "tiny-llama-planted")


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted") / "c"
    model = planted_model()
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), folder, tokens=1500, shard_tokens=400)
    return folder


def test_a_planted_outlier_dimension_starts_far_above_fvu_1_without_centring_and_near_1_with_it(tmp_path, planted_cache):
    x = torch.from_numpy(np.fromfile(planted_cache / "acts-00000.bin", dtype=np.float32)).view(-1, 3, 32)
    assert (x[:, 1, 8].std() / x[:, 1, 8].abs().mean()) < 0.1  # the planted dimension is nearly constant
    starts = {}
    for name, kw in {"old": dict(center_layers=False, b_pre_init="zero"), "new": {}}.items():
        train(cfg(tmp_path / name, planted_cache, tokens=512, init_tokens=512, **kw))
        saved = json.loads((tmp_path / name / "config.json").read_text())
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert saved["init"]["fvu"] == pytest.approx(first["fvu"]) and saved["init"]["tokens"] == 512
        starts[name] = saved["init"]["fvu"]
    assert starts["old"] > 5 and 0.5 < starts["new"] < 1.5, starts


def test_a_run_trains_exactly_the_tokens_asked_even_below_one_step(tmp_path, cache_dir):
    result = train(cfg(tmp_path / "run", cache_dir, tokens=40, tokens_per_step=128, micro_batch_tokens=32))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["tokens"] == 40 and [l["step_tokens"] for l in lines] == [0, 40]
    result = train(cfg(tmp_path / "run2", cache_dir, tokens=200, tokens_per_step=64, micro_batch_tokens=32))
    steps = [json.loads(l)["step_tokens"] for l in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert result["tokens"] == 200 and steps == [0, 64, 64, 64, 8]


def test_training_from_a_cache_records_the_cache_packing_and_refuses_a_contradiction(tmp_path, cache_dir):
    from mlsae.config import DataConfig

    run = cfg(tmp_path / "run", cache_dir, tokens=64)
    run.ctx, run.exclude_first_position = DataConfig.ctx, DataConfig.exclude_first_position  # left at the defaults
    train(run)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["ctx"] == 32 and saved["exclude_first_position"] is True  # the cache's, not the default 2048
    with pytest.raises(MlsaeError, match="--ctx 64 contradicts the cache .* captured with 32: drop --ctx or recapture"):
        train(cfg(tmp_path / "other", cache_dir, tokens=64, ctx=64))
    assert not (tmp_path / "other" / "config.json").exists()  # refused before anything was written


def test_a_micro_batch_too_big_for_memory_is_refused_before_any_work(tmp_path, cache_dir, monkeypatch):
    import mlsae.train

    sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}  # a 1 MiB machine
    monkeypatch.setattr(mlsae.train.os, "sysconf", lambda name: sizes[name])
    # 32 tokens x 3 layers x 64 latents x 4 bytes x 2 = 48 KiB fits; 4096 tokens would need 6 MiB
    with pytest.raises(MlsaeError, match=r"--micro-batch-tokens 4096 needs about .* lower --micro-batch-tokens \(to 512 or less\)"):
        train(cfg(tmp_path / "big", cache_dir, tokens_per_step=4096, micro_batch_tokens=4096))
    assert not (tmp_path / "big").exists()
    train(cfg(tmp_path / "small", cache_dir, tokens=64))
