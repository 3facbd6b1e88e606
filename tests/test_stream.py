"""The activation stream: micro-batches from an offset, and read-ahead in a background thread."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from mlsae.config import TrainConfig
from mlsae.stream import ActivationStream, prefetched
from mlsae.train import train

TEXT = [f"Row {i}: a stream reads ahead while {i % 9} coders train." for i in range(200)]


def test_prefetched_yields_every_item_in_order_from_another_thread():
    threads = []

    def items():
        for i in range(50):
            threads.append(threading.current_thread().name)
            yield i

    assert list(prefetched(items(), 3)) == list(range(50))
    assert set(threads) == {"mlsae-prefetch"}  # produced off the consumer's thread


def test_an_error_while_reading_ahead_reaches_the_consumer_at_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("the cache shard is damaged")

    got = []
    with pytest.raises(ValueError, match="the cache shard is damaged"):
        for item in prefetched(items(), 4):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_releases_the_reader():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetched(items(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    for t in threading.enumerate():
        if t.name == "mlsae-prefetch":
            t.join(timeout=5)
    assert len(produced) < 10  # it stopped reading, a few items ahead at most


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", n_layers=2, seed=3)


def test_a_live_run_with_read_ahead_equals_one_without(tmp_path, tiny):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    common = dict(data=str(tmp_path / "t.jsonl"), expansion_factor=2, k=4, tokens=256, tokens_per_step=64,
                  micro_batch_tokens=32, init_tokens=64, lr=3e-3, ctx=32, device="cpu", shuffle_buffer_mb=1)
    cfg = TrainConfig(**common, prefetch="on", out=str(tmp_path / "on"))
    assert ActivationStream(cfg, tiny).prefetching() and not ActivationStream(TrainConfig(**common), tiny).prefetching()
    train(cfg, model=tiny)
    train(TrainConfig(**common, prefetch="off", out=str(tmp_path / "off")), model=tiny)
    a, b = load_file(str(tmp_path / "on" / "sae.safetensors")), load_file(str(tmp_path / "off" / "sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_from_an_offset_are_the_tail_of_the_batches_from_the_start(tiny, tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    cfg = TrainConfig(data=str(tmp_path / "t.jsonl"), ctx=32, device="cpu", shuffle_buffer_mb=1)
    stream = ActivationStream(cfg, tiny)
    whole = [b.acts for _, b in zip(range(8), stream.batches(16))]
    tail = [b.acts for _, b in zip(range(5), stream.batches(16, skip_rows=48))]
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], tail))
    assert not torch.equal(whole[0], whole[1])  # real, shuffled data: the offset is what matched them
