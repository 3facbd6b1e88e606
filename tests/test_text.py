import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import char_tokenizer
from mlsae.errors import MlsaeError
from mlsae.text import iter_documents, keep_mask, pack_windows, token_stream

DOCS = [f"document {i}: " + "abcdefghij"[: i % 10] * (i % 7 + 1) for i in range(40)]


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_packing_and_sharding_cover_every_token_exactly_once(add_bos, world_size):
    tok = char_tokenizer(add_bos)
    stream = [t for ids in token_stream(DOCS, tok) for t in ids]
    assert stream.count(2) == len(DOCS)  # one EOS after each document
    ctx = 16
    per_rank = [list(pack_windows(DOCS, tok, ctx, rank=r, world_size=world_size)) for r in range(world_size)]
    # window i lives on rank i % world_size: interleave back into the global order
    ordered = [per_rank[i % world_size][i // world_size] for i in range(sum(map(len, per_rank)))]
    body = ctx - add_bos
    assert len(ordered) == len(stream) // body
    for w in ordered:
        assert w.shape == (ctx,) and w.dtype == torch.long
        assert (w[0].item() == 1) == add_bos
    joined = [t for w in ordered for t in w[int(add_bos):].tolist()]
    assert joined == stream[: len(joined)]
    assert len(stream) - len(joined) < body  # only the last partial window is dropped


def test_prepend_bos_settings():
    tok = char_tokenizer(add_bos=False)
    assert next(pack_windows(DOCS, tok, 8, prepend_bos="always"))[0].item() == 1
    assert next(pack_windows(DOCS, char_tokenizer(True), 8, prepend_bos="never"))[0].item() != 1
    with pytest.raises(MlsaeError, match="prepend_bos 'maybe': expected auto, always or never"):
        next(pack_windows(DOCS, tok, 8, prepend_bos="maybe"))


def test_keep_mask_excludes_special_tokens_and_first_position():
    ids = torch.tensor([[1, 5, 6, 2, 7], [5, 0, 6, 6, 1]])
    expected = torch.tensor([[False, True, True, False, True], [False, False, True, True, False]])
    assert torch.equal(keep_mask(ids, {0, 1, 2}), expected)
    expected[1, 0] = True
    assert torch.equal(keep_mask(ids, {0, 1, 2}, exclude_first_position=False), expected)


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    with open(tmp_path / "b.jsonl", "w") as f:
        for t in ["one", "", "two"]:
            f.write(json.dumps({"text": t, "source": "x"}) + "\n")
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"body": ["three", "four"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert list(iter_documents(str(tmp_path / "b.jsonl"))) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "sub" / "c.parquet"), text_field="body")) == ["three", "four"]
    with pytest.raises(MlsaeError, match="c.parquet has no column 'text'"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "sub" / "c.parquet").unlink()
    # a folder: every readable file in sorted order, recursively; empty documents skipped
    assert list(iter_documents(str(tmp_path))) == ["plain text file", "one", "two"]
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["plain text file"]


def test_bad_sources(tmp_path):
    with pytest.raises(MlsaeError, match="holds no .txt, .jsonl or .parquet files"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(MlsaeError, match="holds no text"):
        list(iter_documents(str(tmp_path)))
    with pytest.raises(MlsaeError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    with pytest.raises(MlsaeError, match="shorter than one context window"):
        list(pack_windows(["ab"], char_tokenizer(), 64))


def test_builtin_corpus_is_offline_text_with_disjoint_splits():
    train = iter_documents("builtin:pydocs", "train")
    test = iter_documents("builtin:pydocs", "test")
    first_train, first_test = next(train), next(test)
    assert len(first_train) > 1000 and len(first_test) > 1000
    assert first_train.split("\n")[0] != first_test.split("\n")[0]
    assert "Python Library Documentation" in first_train
