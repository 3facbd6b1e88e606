"""mlsae sweep: several coders from one activation stream, each equal to its run trained alone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.config import SweepConfig, TrainConfig
from mlsae.errors import MlsaeError
from mlsae.text import pack_windows
from mlsae.train import sweep, sweep_runs, train

TEXT = [f"Line {i}: one stream feeds {i % 5} coders while {i * 3} tokens go by." for i in range(300)]
COMMON = dict(data="unused", tokens=640, tokens_per_step=64, micro_batch_tokens=32, checkpoint_tokens=192,
              device="cpu", shuffle_buffer_mb=1, ctx=32, decoder_impl="sparse", init_tokens=128, dead_tokens=200)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=3, seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("sweep-cache") / "c"
    write_cache(tiny, pack_windows(TEXT, tiny.tokenizer, 32), folder, tokens=1200, shard_tokens=400)
    return folder


def sweep_cfg(out, **kw):
    return SweepConfig(**{**COMMON, "arch": ["mlsae", "per-layer"], "expansion_factor": [2, 4], "k": [4], "lr": [3e-3],
                          "out": str(out), **kw})


def same_run(a, b):
    """Bit-identical weights and the same metrics (the clock aside)."""
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert ma == mb


def test_every_run_of_a_sweep_equals_the_run_trained_alone(tmp_path, cache_dir):
    results = sweep(sweep_cfg(tmp_path / "sweep", cache=str(cache_dir)))
    assert list(results) == ["mlsae-R2-k4-lr0.003", "mlsae-R4-k4-lr0.003", "per-layer-R2-k4-lr0.003", "per-layer-R4-k4-lr0.003"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"] == list(results)
    fvus = {name: r["fvu"] for name, r in results.items()}
    assert len(set(fvus.values())) == 4  # four different coders, not one copied
    for name, run in sweep_runs(sweep_cfg(tmp_path / "sweep", cache=str(cache_dir))).items():
        alone = tmp_path / "alone" / name
        train(TrainConfig(**{**run.__dict__, "out": str(alone)}))
        same_run(tmp_path / "sweep" / name, alone)
        saved = json.loads((tmp_path / "sweep" / name / "config.json").read_text())
        assert saved["finished"] and saved["train"]["out"] == str(tmp_path / "sweep" / name)
        assert saved["sae"]["arch"] == run.arch and saved["train"]["expansion_factor"] == run.expansion_factor


def test_a_live_sweep_runs_the_model_once_for_all_its_coders(tmp_path, tiny, monkeypatch):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    calls = []
    real = type(tiny).capture

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny), "capture", counted)
    live = dict(data=str(tmp_path / "t.jsonl"), tokens=320)
    sweep(sweep_cfg(tmp_path / "sweep", arch=["mlsae"], **live), model=tiny)
    in_sweep, calls[:] = len(calls), []
    run = sweep_runs(sweep_cfg(tmp_path / "sweep", arch=["mlsae"], **live))["mlsae-R2-k4-lr0.003"]
    train(TrainConfig(**{**run.__dict__, "out": str(tmp_path / "alone")}), model=tiny)
    assert in_sweep == len(calls) > 0  # two coders, the captures of one
    same_run(tmp_path / "sweep" / "mlsae-R2-k4-lr0.003", tmp_path / "alone")


def test_a_resumed_sweep_ends_where_an_uninterrupted_one_does_even_with_runs_at_different_points(tmp_path, cache_dir):
    full = sweep_cfg(tmp_path / "full", cache=str(cache_dir), arch=["mlsae"])
    sweep(full)
    sweep(sweep_cfg(tmp_path / "part", cache=str(cache_dir), arch=["mlsae"], tokens=256))
    ahead = sweep_runs(sweep_cfg(tmp_path / "part", cache=str(cache_dir), arch=["mlsae"], tokens=448))["mlsae-R4-k4-lr0.003"]
    train(TrainConfig(**{**ahead.__dict__, "resume": True}))  # one run moves on alone
    sweep(sweep_cfg(tmp_path / "part", cache=str(cache_dir), arch=["mlsae"], resume=True))
    for name in ("mlsae-R2-k4-lr0.003", "mlsae-R4-k4-lr0.003"):
        same_run(tmp_path / "full" / name, tmp_path / "part" / name)


def test_bad_sweeps_are_refused_before_anything_is_written(tmp_path, cache_dir):
    with pytest.raises(MlsaeError, match="--k 4 4: each value once"):
        sweep(sweep_cfg(tmp_path / "a", cache=str(cache_dir), k=[4, 4]))
    with pytest.raises(MlsaeError, match="--n-latents fixes the latents of every run"):
        sweep(sweep_cfg(tmp_path / "b", cache=str(cache_dir), n_latents=16))
    with pytest.raises(MlsaeError, match="--k 40 is larger than --n-latents 16"):
        sweep(sweep_cfg(tmp_path / "c", cache=str(cache_dir), expansion_factor=[2], n_latents=16, k=[4, 40]))
    (tmp_path / "d" / "mlsae-R4-k4-lr0.003").mkdir(parents=True)
    (tmp_path / "d" / "mlsae-R4-k4-lr0.003" / "config.json").write_text("{}")
    with pytest.raises(MlsaeError, match="mlsae-R4-k4-lr0.003 already holds a run; pass --resume"):
        sweep(sweep_cfg(tmp_path / "d", cache=str(cache_dir)))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["mlsae-R4-k4-lr0.003"]
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_sweep_command_line(tmp_path, cache_dir, capsys):
    from mlsae.cli import main

    args = ["sweep", "--cache", str(cache_dir), "--arch", "mlsae", "--expansion-factor", "2", "3", "-k", "4", "--lr", "0.003",
            "0.001", "--tokens", "128", "--tokens-per-step", "64", "--micro-batch-tokens", "32", "--init-tokens", "64",
            "--shuffle-buffer-mb", "1", "--device", "cpu", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 runs saved in" in out and "mlsae-R3-k4-lr0.001" in out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "mlsae-R2-k4-lr0.001", "mlsae-R2-k4-lr0.003", "mlsae-R3-k4-lr0.001", "mlsae-R3-k4-lr0.003", "sweep.json"]
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
