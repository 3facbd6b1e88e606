"""Data-parallel training under torchrun: two CPU processes (gloo) against one."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.config import TrainConfig
from mlsae.text import pack_windows
from mlsae.train import train

TEXT = [f"Doc {i}: two processes share the batch of one while {i * 11 % 17} latents fire." for i in range(300)]
SETTINGS = dict(expansion_factor=2, k=4, tokens=640, tokens_per_step=64, micro_batch_tokens=32, init_tokens=128, lr=3e-3,
                checkpoint_tokens=192, dead_tokens=150, shuffle_buffer_mb=1, device="cpu", decoder_impl="sparse")


def flags(**kw) -> list[str]:
    out = []
    for k, v in {**SETTINGS, **kw}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    model = tiny_model("llama", n_layers=3, seed=5)
    folder = tmp_path_factory.mktemp("dist") / "c"
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), folder, tokens=1200, shard_tokens=500)
    return folder


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n -m mlsae.cli ARGS``: what a user launches."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "mlsae.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and STARTUP_RACE.search(done.stderr):  # the free port torchrun picked was taken meanwhile
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return done


# The one failure of launching itself, before any process has read or written anything: retried once.
STARTUP_RACE = re.compile(r"EADDRINUSE|[Aa]ddress already in use|RendezvousConnectionError")


def launched(n: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun`` that must succeed: its stderr is the failure message."""
    done = torchrun(n, *args)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def trained_run(tmp_path, cache_dir):
    """A run in tmp_path/run whose model is a saved folder the launched processes load too; the model."""
    model = tiny_model("llama", n_layers=3, seed=5)
    train(TrainConfig(cache=str(cache_dir), out=str(tmp_path / "run"), **SETTINGS))
    model.model.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    meta["model"] = str(tmp_path / "model")
    (tmp_path / "run" / "config.json").write_text(json.dumps(meta))
    return model


def weights(folder):
    return load_file(str(folder / "sae.safetensors"))


def close(a, b, tol=2e-4):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=tol, atol=tol), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.parametrize("arch", ["mlsae", "per-layer"])
def test_two_processes_train_the_weights_one_process_trains_on_the_same_global_batches(tmp_path, cache_dir, arch):
    train(TrainConfig(cache=str(cache_dir), arch=arch, out=str(tmp_path / "one"), **SETTINGS))
    launched(2, "train", "--cache", str(cache_dir), "--arch", arch, "--out", str(tmp_path / "two"), *flags())
    close(tmp_path / "one", tmp_path / "two")
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["finished"]
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == list(range(11)) and [m["tokens"] for m in two] == [m["tokens"] for m in one]
    for a, b in zip(one, two):  # the logged FVU is the whole batch's, not one rank's share
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-3) and b["dead_fraction"] == a["dead_fraction"]


def test_a_run_resumed_under_two_processes_ends_as_an_uninterrupted_one_and_refuses_another_world_size(tmp_path, cache_dir):
    common = ["train", "--cache", str(cache_dir)]
    launched(2, *common, "--out", str(tmp_path / "full"), *flags())
    launched(2, *common, "--out", str(tmp_path / "part"), *flags(tokens=256))
    one = subprocess.run([sys.executable, "-m", "mlsae.cli", *common, "--out", str(tmp_path / "part"), "--resume", *flags()],
                         capture_output=True, text=True)
    assert one.returncode == 2 and "trained by 2 process(es), not 1: resume it with the same world size" in one.stderr
    launched(2, *common, "--out", str(tmp_path / "part"), "--resume", *flags())
    close(tmp_path / "full", tmp_path / "part", tol=1e-6)


def test_a_world_size_that_does_not_divide_the_batches_is_refused_before_any_work(tmp_path, cache_dir):
    done = torchrun(2, "train", "--cache", str(cache_dir), "--out", str(tmp_path / "odd"), *flags(tokens_per_step=99, micro_batch_tokens=33))
    assert done.returncode != 0
    assert "--tokens-per-step 99 is not a multiple of the world size 2" in done.stderr
    assert not (tmp_path / "odd").exists()


def test_a_sweep_runs_under_two_processes(tmp_path, cache_dir):
    launched(2, "sweep", "--cache", str(cache_dir), "--out", str(tmp_path / "s"), *flags(),
                    "--expansion-factor", "2", "3")
    train(TrainConfig(cache=str(cache_dir), out=str(tmp_path / "alone"), **{**SETTINGS, "expansion_factor": 3}))
    close(tmp_path / "alone", tmp_path / "s" / "mlsae-R3-k4-lr0.003")


@pytest.mark.parametrize("source", ["cache", "text"])
def test_eval_under_two_processes_writes_the_table_of_one(tmp_path, cache_dir, source):
    """Each process reads every other part of the held-out data (and splices every other batch);
    the sums are added up: the same table as one process, to float tolerance."""
    import pyarrow.parquet as pq

    from mlsae.evaluate import evaluate

    model = trained_run(tmp_path, cache_dir)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t.lower()}) for t in TEXT))
    data = str(cache_dir) if source == "cache" else str(tmp_path / "t.jsonl")
    args = ["eval", str(tmp_path / "run"), "--data", data, "--tokens", "700", "--downstream-tokens", "150",
            "--batch-tokens", "128", "--ctx", "32", "--device", "cpu", "--no-reuse-ablations"]
    one = evaluate(tmp_path / "run", data, 700, 150, ctx=32, model=model, device="cpu", batch_tokens=128, progress=False,
                   out=tmp_path / "one", reuse_ablations=False)
    launched(2, *args, "--out", str(tmp_path / "two"))
    two = pq.read_table(tmp_path / "two" / "eval.parquet")
    assert two.column_names == one.column_names and two.column("layer").to_pylist() == one.column("layer").to_pylist()
    for col in one.column_names[1:]:
        for a, b in zip(one.column(col).to_pylist(), two.column(col).to_pylist()):
            assert (a is None and b is None) or b == pytest.approx(a, rel=1e-4, abs=1e-6), col
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["tokens"] == 700


def test_analyze_under_two_processes_writes_the_tables_of_one(tmp_path, cache_dir):
    """Layer distributions, drift and top examples accumulated per process and merged: the tables of one process."""
    import pyarrow.parquet as pq

    from mlsae.analyze import analyze

    model = trained_run(tmp_path, cache_dir)
    one = analyze(tmp_path / "run", str(cache_dir), 900, model=model, device="cpu", batch_tokens=128, top_n=4,
                  out=tmp_path / "one", progress=False)
    launched(2, "analyze", str(tmp_path / "run"), "--data", str(cache_dir), "--tokens", "900", "--batch-tokens", "128",
                    "--top-n", "4", "--device", "cpu", "--out", str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["n_tokens"] == one["n_tokens"] == 900
    for key in ("variance_ratio", "variance_ratio_paper", "multi_layer_fraction_aggregated", "multi_layer_fraction_per_token"):
        assert two["layers"][key] == pytest.approx(one["layers"][key], rel=1e-6), key
    assert two["drift"]["mean_cosine"] == pytest.approx(one["drift"]["mean_cosine"], rel=1e-6)
    for name in ("latents", "layer_distribution", "examples", "histograms"):
        a, b = pq.read_table(tmp_path / "one" / f"{name}.parquet"), pq.read_table(tmp_path / "two" / f"{name}.parquet")
        assert a.column_names == b.column_names and a.num_rows == b.num_rows > 0, name
        for col in a.column_names:
            x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
            if a.schema.field(col).type in ("double", "float"):
                assert [v is None for v in x] == [v is None for v in y], (name, col)
                assert [v for v in y if v is not None] == pytest.approx([v for v in x if v is not None], rel=1e-6, abs=1e-9,
                                                                         nan_ok=True), (name, col)
            else:
                assert x == y, (name, col)


# --------------------------------------------------------------------------------------------
# Splitting the coder itself: layers (per-layer SAEs) or latents over the processes


def test_distribute_layers_trains_the_per_layer_saes_one_process_trains(tmp_path, cache_dir):
    """3 layers over 2 processes (2 + 1): the activations are exchanged, each process trains its
    layers' SAEs on the whole batches, and rank 0 writes the whole coder."""
    train(TrainConfig(cache=str(cache_dir), arch="per-layer", out=str(tmp_path / "one"), **SETTINGS))
    launched(2, "train", "--cache", str(cache_dir), "--arch", "per-layer", "--distribute-layers",
                    "--out", str(tmp_path / "two"), *flags())
    close(tmp_path / "one", tmp_path / "two", tol=1e-5)
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two):  # every layer's FVU, gathered from the process that holds it
        assert b["fvu_per_layer"] == pytest.approx(a["fvu_per_layer"], rel=1e-4) and b["dead_fraction"] == a["dead_fraction"]


@pytest.mark.parametrize("arch", ["mlsae", "concat"])
def test_shard_latents_trains_the_coder_one_process_trains(tmp_path, cache_dir, arch):
    extra = {"expansion_factor": 1} if arch == "concat" else {}
    train(TrainConfig(cache=str(cache_dir), arch=arch, out=str(tmp_path / "one"), **{**SETTINGS, **extra}))
    launched(2, "train", "--cache", str(cache_dir), "--arch", arch, "--shard-latents",
                    "--out", str(tmp_path / "two"), *flags(**extra))
    close(tmp_path / "one", tmp_path / "two", tol=1e-5)


@pytest.mark.parametrize("arch, split", [("mlsae", "--shard-latents"), ("per-layer", "--distribute-layers")])
def test_a_split_run_resumed_from_its_checkpoint_ends_as_one_process(tmp_path, cache_dir, arch, split):
    """The checkpoint holds the whole coder and optimizer (assembled on rank 0); each process
    takes its latents or layers back from it."""
    train(TrainConfig(cache=str(cache_dir), arch=arch, out=str(tmp_path / "one"), **SETTINGS))
    common = ["train", "--cache", str(cache_dir), "--arch", arch, split, "--out", str(tmp_path / "part")]
    launched(2, *common, *flags(tokens=256))
    launched(2, *common, "--resume", *flags())
    close(tmp_path / "one", tmp_path / "part", tol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--arch", "per-layer", "--distribute-layers"], "--distribute-layers with 4 processes and 3 layers: each process needs at least one layer"),
    (["--distribute-layers"], "--distribute-layers splits a per-layer coder's SAEs over the processes; a mlsae coder has one dictionary"),
    (["--shard-latents", "--distribute-layers", "--arch", "per-layer"], "choose one way to split the coder"),
])
def test_a_split_that_cannot_work_is_refused_before_any_work(tmp_path, cache_dir, extra, message):
    done = torchrun(4, "train", "--cache", str(cache_dir), "--out", str(tmp_path / "bad"), *extra, *flags())
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def _sharded_dictionary(rank: int, size: int, init: str, out: str) -> None:
    """One process of :func:`test_the_sharded_dictionary_codes_exactly_as_the_whole_one`."""
    import torch.distributed as tdist

    from mlsae.dist import World
    from mlsae.sae import TopK
    from mlsae.sharding import LatentShard, split_sizes

    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    torch.manual_seed(0)
    whole = TopK(8, 37, 5, torch.Generator().manual_seed(1))
    x = torch.randn(64, 8)
    sizes = split_sizes(37, size)
    start = sum(sizes[:rank])
    part = TopK(8, sizes[rank], 5)
    part.load_state_dict({k: (v[start : start + sizes[rank]] if k in TopK.SHARDED else v) for k, v in whole.state_dict().items()})
    part.shard = LatentShard(World(rank, size), start, sizes[rank], 37)
    dead = torch.zeros(37, dtype=torch.bool)
    dead[[0, 3, 5]] = True  # all in the first process's rows: the others have no candidate
    acts, idx, _ = part.encode(x, "sparse")
    x_hat = part.decode(acts, idx, "sparse")
    e_hat = part.auxk_reconstruction(x, dead, 2, "sparse")
    (x_hat.pow(2).sum() + e_hat.pow(3).sum()).backward()
    torch.save({"acts": acts, "idx": idx, "x_hat": x_hat.detach(), "e_hat": e_hat.detach(), "start": start,
                "grads": {n: p.grad for n, p in part.named_parameters()}}, f"{out}/{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_the_sharded_dictionary_codes_exactly_as_the_whole_one(tmp_path, size):
    """Each process's local top k, merged: the same latents and activations as the whole dictionary
    (exactly), the same reconstruction and AuxK reconstruction, and each process's rows' gradients."""
    import torch.multiprocessing as mp

    from mlsae.sae import TopK

    mp.spawn(_sharded_dictionary, args=(size, str(tmp_path / "init"), str(tmp_path)), nprocs=size)
    torch.manual_seed(0)
    whole = TopK(8, 37, 5, torch.Generator().manual_seed(1))
    x = torch.randn(64, 8)
    dead = torch.zeros(37, dtype=torch.bool)
    dead[[0, 3, 5]] = True
    acts, idx, _ = whole.encode(x, "sparse")
    x_hat = whole.decode(acts, idx, "sparse")
    e_hat = whole.auxk_reconstruction(x, dead, 2, "sparse")
    (x_hat.pow(2).sum() + e_hat.pow(3).sum()).backward()
    order = idx.argsort(1)
    grads = {n: [] for n, _ in whole.named_parameters()}
    for rank in range(size):
        got = torch.load(tmp_path / f"{rank}.pt")
        mine = got["idx"].argsort(1)
        assert torch.equal(got["idx"].gather(1, mine), idx.gather(1, order))  # exactly the same latents
        assert torch.equal(got["acts"].gather(1, mine), acts.gather(1, order))  # with exactly the same values
        assert torch.allclose(got["x_hat"], x_hat, atol=1e-5) and torch.allclose(got["e_hat"], e_hat, atol=1e-5)
        for n, g in got["grads"].items():
            grads[n].append(g)
    for n, p in whole.named_parameters():
        joined = torch.cat(grads[n]) if n in TopK.SHARDED else grads[n][0]
        assert torch.allclose(joined, p.grad, atol=1e-4), n
        if n not in TopK.SHARDED:  # a whole parameter gets the same gradient on every process
            assert all(torch.allclose(g, grads[n][0]) for g in grads[n])


def test_a_cache_with_fewer_shards_than_processes_is_split_by_rows(tmp_path):
    """Processes take every N-th row of the shuffled order, not whole shards: a one-shard cache
    feeds two processes the batches one process would see."""
    model = tiny_model("llama", n_layers=3, seed=5)
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), tmp_path / "one-shard", tokens=800, shard_tokens=10_000)
    assert len(json.loads((tmp_path / "one-shard" / "manifest.json").read_text())["shards"]) == 1
    train(TrainConfig(cache=str(tmp_path / "one-shard"), out=str(tmp_path / "one"), **{**SETTINGS, "tokens": 384}))
    launched(2, "train", "--cache", str(tmp_path / "one-shard"), "--out", str(tmp_path / "two"), *flags(tokens=384))
    close(tmp_path / "one", tmp_path / "two")
