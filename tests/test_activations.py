import pytest
import torch

from conftest import tiny_model
from mlsae.activations import ActivationCache, check_finite, live_batches, write_cache
from mlsae.errors import MlsaeError
from mlsae.text import keep_mask, pack_windows

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3 + str(i) for i in range(60)]


def windows(model, ctx=24):
    return list(pack_windows(TEXT, model.tokenizer, ctx))


def test_live_batches_keep_only_counted_positions():
    model = tiny_model("llama", n_layers=3)
    wins = windows(model)
    batches = list(live_batches(model, wins, layers=[0, 2], windows_per_batch=5))
    ids = torch.stack(wins)
    full = model.capture(ids, [0, 2])
    keep = keep_mask(ids, {0, 1, 2})
    acts = torch.cat([b.acts for b in batches])
    torch.testing.assert_close(acts, full[keep], rtol=0, atol=0)
    window = torch.cat([b.window for b in batches])
    position = torch.cat([b.position for b in batches])
    assert torch.equal(torch.cat([b.token_ids for b in batches]), ids[window, position])
    assert (position > 0).all() and not torch.isin(ids[window, position], torch.tensor([0, 1, 2])).any()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cache_round_trip(tmp_path, dtype):
    model = tiny_model("gpt_neox", n_layers=3)
    wins = windows(model)
    manifest = write_cache(model, iter(wins), tmp_path / "c", tokens=300, dtype=dtype, shard_tokens=64, windows_per_batch=4)
    assert manifest["n_tokens"] == 300 and len(manifest["shards"]) == 5
    expected = torch.cat([b.acts for b in live_batches(model, wins, windows_per_batch=4)])[:300]
    cache = ActivationCache(tmp_path / "c")
    assert len(cache) == 300
    got = list(cache.batches(128, shuffle=False))
    assert [len(b) for b in got] == [128, 128, 44]
    acts = torch.cat([b.acts for b in got])
    torch.testing.assert_close(acts, expected.to(getattr(torch, dtype)).float(), rtol=0, atol=0)
    ids = torch.stack(wins)
    row_window = torch.cat([b.window for b in got])
    row_pos = torch.cat([b.position for b in got])
    assert torch.equal(torch.cat([b.token_ids for b in got]), ids[row_window, row_pos])
    cache.check_matches(model.fingerprint(), [0, 1, 2], dtype)


def test_cache_shuffled_read_covers_every_row_once_within_bounded_memory(tmp_path, monkeypatch):
    model = tiny_model("gpt2", n_layers=2)
    write_cache(model, iter(windows(model)), tmp_path / "c", tokens=500, shard_tokens=100)
    cache = ActivationCache(tmp_path / "c")
    sizes = []
    real_read = cache._read
    monkeypatch.setattr(cache, "_read", lambda index: (sizes.append(len(index)), real_read(index))[1])
    # a cache larger than the buffer: make the buffer tiny by pretending rows are huge
    cache.manifest["row_bytes"] = 2**20 // 50  # 50 rows per MB
    batches = list(cache.batches(16, shuffle=True, seed=3, buffer_mb=1))
    assert max(sizes) <= 50 and len(sizes) > 1
    keys = torch.cat([b.window * 1000 + b.position for b in batches])
    plain = torch.cat([b.window * 1000 + b.position for b in cache.batches(16, shuffle=False)])
    assert sorted(keys.tolist()) == sorted(plain.tolist()) and len(set(keys.tolist())) == 500
    assert keys.tolist() != plain.tolist()  # actually shuffled
    assert all(len(b) == 16 for b in batches[:-1])
    again = torch.cat([b.window * 1000 + b.position for b in cache.batches(16, shuffle=True, seed=3, buffer_mb=1)])
    assert torch.equal(keys, again)  # the order depends only on the seed


def test_cache_refuses_another_model_layers_or_dtype(tmp_path):
    model = tiny_model("llama", n_layers=3)
    write_cache(model, iter(windows(model)), tmp_path / "c", tokens=50, layers=[0, 1], dtype="float16")
    cache = ActivationCache(tmp_path / "c")
    with pytest.raises(MlsaeError, match="was written for another model"):
        cache.check_matches(tiny_model("llama", n_layers=3, seed=5).fingerprint())
    with pytest.raises(MlsaeError, match=r"holds layers \[0, 1\], not the requested \[0, 1, 2\]"):
        cache.check_matches(layers=[0, 1, 2])
    with pytest.raises(MlsaeError, match="is stored as float16, not the requested float32"):
        cache.check_matches(dtype="float32")
    with pytest.raises(MlsaeError, match="already holds a cache; pass --overwrite"):
        write_cache(model, iter(windows(model)), tmp_path / "c", tokens=50)
    with pytest.raises(MlsaeError, match="has no manifest.json"):
        ActivationCache(tmp_path)


def test_cache_that_runs_out_of_text_says_so(tmp_path):
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(MlsaeError, match="the text ran out after"):
        write_cache(model, iter(windows(model)[:3]), tmp_path / "c", tokens=10_000)


def test_check_finite_names_the_layer():
    acts = torch.zeros(4, 3, 8)
    check_finite(acts, "step 7", [0, 5, 9])
    acts[2, 1, 3] = float("nan")
    with pytest.raises(MlsaeError, match="step 7: NaN or inf activations at layer 5"):
        check_finite(acts, "step 7", [0, 5, 9])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_truncated_or_corrupted_shard_is_named_and_refused(tmp_path, dtype):
    import hashlib
    import json

    model = tiny_model("llama", n_layers=3)
    write_cache(model, iter(windows(model)), tmp_path / "c", tokens=200, dtype=dtype, shard_tokens=64)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    shard = manifest["shards"][1]
    path = tmp_path / "c" / shard["acts"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["acts_sha256"]  # the recorded checksum is the file's
    ActivationCache(tmp_path / "c", verify=True)  # intact: accepted
    data = bytearray(path.read_bytes())
    data[10] ^= 0x55
    path.write_bytes(bytes(data))
    ActivationCache(tmp_path / "c")  # same size: only the checksum can tell
    with pytest.raises(MlsaeError, match=r"acts-00001.bin is corrupted \(its checksum does not match the manifest\)"):
        ActivationCache(tmp_path / "c", verify=True)
    path.write_bytes(bytes(data[:-7]))
    with pytest.raises(MlsaeError, match=r"shard acts-00001.bin is truncated or damaged"):
        ActivationCache(tmp_path / "c")


def test_a_full_disk_while_caching_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    import numpy as np

    model = tiny_model("llama", n_layers=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(MlsaeError, match="could not write cache shard 00000 in .*: no space left on the device"):
        write_cache(model, iter(windows(model)), tmp_path / "c", tokens=100, shard_tokens=64)


def test_a_cache_reads_a_subset_of_its_layers(tmp_path):
    model = tiny_model("llama", n_layers=3)
    write_cache(model, iter(windows(model)), tmp_path / "c", tokens=60, layers=[0, 1, 2])
    full = torch.cat([b.acts for b in ActivationCache(tmp_path / "c").batches(25, shuffle=False)])
    part = ActivationCache(tmp_path / "c", layers=[0, 2])
    assert part.layers == [0, 2]
    sub = torch.cat([b.acts for b in part.batches(25, shuffle=False)])
    assert torch.equal(sub, full[:, [0, 2]])
    shuffled = torch.cat([b.acts for b in part.batches(25, shuffle=True, seed=1)])
    assert shuffled.shape == sub.shape and not torch.equal(shuffled, sub)
    with pytest.raises(MlsaeError, match=r"holds layers \[0, 1, 2\], not layer 5"):
        ActivationCache(tmp_path / "c", layers=[0, 5])
