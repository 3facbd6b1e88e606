"""The hub code (push_to_hub, from_pretrained, the model card) against a local folder standing in
for a repo: no network."""

import json

import pytest
import torch

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.config import TrainConfig
from mlsae.errors import MlsaeError
from mlsae.runs import open_run
from mlsae.sae import load_coder
from mlsae.text import pack_windows
from mlsae.train import train

TEXT = [f"Card {i}: a shared coder says what it was trained on, {i * 5 % 11} times over." for i in range(200)]
SETTINGS = dict(expansion_factor=2, k=4, tokens=384, tokens_per_step=64, micro_batch_tokens=64, init_tokens=128, lr=3e-3,
                dead_tokens=150, shuffle_buffer_mb=1, device="cpu", standardize=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3, seed=3)


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "c"
    write_cache(model, pack_windows(TEXT, model.tokenizer, 32), folder, tokens=700, shard_tokens=400)
    return folder


def trained(tmp_path, cache, arch):
    out = tmp_path / arch
    train(TrainConfig(cache=str(cache), arch=arch, out=str(out), **SETTINGS))
    return out




class LocalHub:
    """Stands in for ``huggingface_hub.HfApi``: the repo is a local folder."""

    def __init__(self, root):
        self.root = root
        self.created = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
        self.created.append((repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
        import shutil

        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


def test_push_to_hub_uploads_the_run_its_exports_and_a_model_card_that_from_pretrained_loads(tmp_path, cache, model, monkeypatch):
    from mlsae import hub
    from mlsae.evaluate import evaluate

    run = trained(tmp_path, cache, "mlsae")
    evaluate(run, str(cache), 300, 0, model=model, device="cpu", progress=False)
    api = LocalHub(tmp_path / "hub")
    url = hub.push_to_hub(run, "someone/tiny-mlsae", private=True, api=api)
    repo = tmp_path / "hub" / "someone" / "tiny-mlsae"
    assert url.endswith("someone/tiny-mlsae") and api.created == [("someone/tiny-mlsae", True)]
    assert (repo / "sparsify" / "layers.1" / "sae.safetensors").is_file()
    assert (repo / "saelens" / "blocks.2.hook_resid_post" / "cfg.json").is_file()
    card = (repo / "README.md").read_text()
    meta = json.loads((run / "config.json").read_text())
    import pyarrow.parquet as pq

    fvu = pq.read_table(run / "eval.parquet").column("fvu").to_pylist()
    assert meta["model"] in card and "| layers | 0, 1, 2" in card and "k = 4" in card and "384" in card
    assert f"{fvu[0]:.4g}" in card  # the evaluation table
    assert 'SparseCoder.load_from_hub("someone/tiny-mlsae", hookpoint="sparsify/layers.0")' in card
    coder, loaded = hub.from_pretrained(repo)
    want, _ = load_coder(run)
    for k, v in want.state_dict().items():
        assert torch.equal(coder.state_dict()[k], v), k
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "hub" / repo_id))
    coder, _ = hub.from_pretrained("someone/tiny-mlsae")
    assert torch.equal(coder.state_dict()["sae.W_dec"], want.state_dict()["sae.W_dec"])


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "bad name/x", "x/--y"])
def test_a_malformed_repo_id_is_refused_with_one_line_before_anything_is_sent(tmp_path, cache, repo_id):
    from mlsae import hub

    api = LocalHub(tmp_path / "hub")
    with pytest.raises(MlsaeError, match="is malformed .*: expected 'user-or-org/name'"):
        hub.push_to_hub(tmp_path / "none", repo_id, api=api)
    assert api.created == []
