import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_model
from mlsae.activations import write_cache
from mlsae.config import TrainConfig
from mlsae.errors import MlsaeError
from mlsae.evaluate import ReconstructionStats, _ce_kl, compare, downstream, evaluate
from mlsae.model import _hidden
from mlsae.text import pack_windows
from mlsae.train import train

TEXT = [f"Line {i}: a small model reads some text and predicts {i % 13} things." for i in range(200)]


class Oracle(torch.nn.Module):
    """A coder whose reconstruction is exact."""

    def __init__(self, layers, noise=0.0):
        super().__init__()
        self.layers, self.noise = layers, noise

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        return SimpleNamespace(x_hat=x + self.noise * x.std() * torch.randn(x.shape, generator=g))


def test_reconstruction_stats_match_numpy():
    torch.manual_seed(0)
    x = torch.randn(50, 2, 6) * torch.tensor([1.0, 10.0])[None, :, None] + 3
    x_hat = x + torch.randn_like(x) * 0.5
    top_idx = torch.randint(0, 5, (50, 2, 3))
    top_acts = torch.rand(50, 2, 3) * (torch.rand(50, 2, 3) > 0.3)
    stats = ReconstructionStats(2, n_latents=8, per_layer_dictionaries=False)
    for sl in (slice(0, 20), slice(20, 50)):  # streamed in two batches
        stats.update(x[sl], x_hat[sl], top_acts[sl], top_idx[sl])
    t = stats.table()
    xn, hn = x.double().numpy(), x_hat.double().numpy()
    for l in range(2):
        xl, hl = xn[:, l], hn[:, l]
        assert t["fvu"][l] == pytest.approx(((xl - hl) ** 2).sum() / ((xl - xl.mean(0)) ** 2).sum(), rel=1e-9)
        assert t["mse"][l] == pytest.approx(((xl - hl) ** 2).mean(), rel=1e-9)
        assert t["l0"][l] == pytest.approx((top_acts[:, l] > 0).sum().item() / 50)
        assert t["l1"][l] == pytest.approx(top_acts[:, l].sum().item() / 50, rel=1e-6)
        fired = set(top_idx[:, l][top_acts[:, l] > 0].tolist())
        assert t["dead_fraction"][l] == pytest.approx(1 - len(fired) / 8)
        ms = xl.mean(-1, keepdims=True)
        sd = np.sqrt(((xl - ms) ** 2).mean(-1, keepdims=True) + 1e-6)
        xs, hs = (xl - ms) / sd, (hl - ms) / sd
        assert t["fvu_standardized"][l] == pytest.approx(((xs - hs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum(), rel=1e-6)
    assert t["fvu"][2] == pytest.approx((t["fvu"][0] + t["fvu"][1]) / 2)
    # one shared dictionary: dead means silent at every layer (indices 5-7 never occur)
    assert t["dead_fraction"][2] == pytest.approx(3 / 8)


def test_paper_fvu_uses_one_scalar_mean_per_layer():
    torch.manual_seed(1)
    # components with very different means: the per-component mean explains them, a scalar does not
    x = torch.randn(40, 2, 5) + torch.tensor([0.0, 10.0, -4.0, 3.0, 7.0])
    x_hat = x.mean(0, keepdim=True).expand_as(x)  # the per-layer mean vector
    stats = ReconstructionStats(2, n_latents=4, per_layer_dictionaries=False)
    stats.update(x, x_hat, torch.ones(40, 2, 1), torch.zeros(40, 2, 1, dtype=torch.long))
    t = stats.table()
    for l in range(2):
        xl = x[:, l].double().numpy()
        err = ((xl - x_hat[:, l].double().numpy()) ** 2).sum()
        assert t["fvu_paper"][l] == pytest.approx(err / ((xl - xl.mean()) ** 2).sum(), rel=1e-9)
        assert t["fvu"][l] == pytest.approx(1.0, rel=1e-9)  # ours: the mean vector explains nothing
        assert t["fvu_paper"][l] < 0.2  # theirs: the mean vector explains the spread between components


def test_ce_kl_against_numpy():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    clean = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lp = torch.log_softmax(logits[:, :-1], -1)
    clp = torch.log_softmax(clean[:, :-1], -1)
    ce, kl, n = _ce_kl(lp, clp, ids[:, 1:], mask)
    ce_np = kl_np = 0.0
    cnt = 0
    for b in range(2):
        for t in range(4):
            if mask[b, t]:
                p = np.exp(clean[b, t].double().numpy()); p /= p.sum()
                q = np.exp(logits[b, t].double().numpy()); q /= q.sum()
                ce_np -= np.log(q[ids[b, t + 1]])
                kl_np += (p * np.log(p / q)).sum()
                cnt += 1
    assert n == cnt and ce == pytest.approx(ce_np, rel=1e-5) and kl == pytest.approx(kl_np, rel=1e-4)


@pytest.fixture(scope="module")
def tiny():
    """A tiny model trained briefly on the text, so that its layers matter for its predictions."""
    model = tiny_model("llama", n_layers=3, seed=2)
    ids = torch.stack(list(pack_windows(TEXT, model.tokenizer, 24))[:64])
    hf = model.model
    hf.requires_grad_(True).train()
    opt = torch.optim.Adam(hf.parameters(), lr=1e-2)
    for _ in range(60):
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    hf.requires_grad_(False).eval()
    assert loss.item() < 2.5  # far below uniform (ln 104 = 4.6)
    return model


def _windows(model, n=4, ctx=24):
    return list(pack_windows(TEXT, model.tokenizer, ctx))[:n]


def test_oracle_gives_zero_delta_ce_and_kl_and_ablation_hurts(tiny):
    wins = _windows(tiny)
    means = torch.zeros(3, 32)
    out = downstream(tiny, Oracle([0, 1, 2]), wins, [0, 1, 2], means, True, 2, progress=False)
    for l in range(4):
        assert abs(out["delta_ce"][l]) < 1e-5 and abs(out["kl"][l]) < 1e-6
        assert out["loss_recovered_zero"][l] == pytest.approx(1.0, abs=1e-4)
    assert all(ce > out["ce_clean"][0] + 0.1 for ce in out["ce_zero"][:3])
    bad = downstream(tiny, Oracle([0, 1, 2], noise=1.0), wins, [0, 1, 2], means, True, 2, progress=False)
    assert all(k >= 0 for k in bad["kl"]) and all(k > 1e-4 for k in bad["kl"][:3])
    assert all(d > 0 for d in bad["delta_ce"][:3])


class Recorder(torch.nn.Module):
    """A coder that returns a scaled copy of its input and records which vectors it was given."""

    def __init__(self, layers, scale):
        super().__init__()
        self.layers, self.scale, self.calls = layers, scale, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return SimpleNamespace(x_hat=x * self.scale)


def test_mean_ablation_splices_the_means_at_the_kept_positions_only_and_scores_those(tiny):
    from mlsae.model import special_token_ids
    from mlsae.text import keep_mask

    wins = _windows(tiny, 2)
    ids = torch.stack(wins)
    keep = keep_mask(ids, special_token_ids(tiny.tokenizer), True)
    means = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 3  # non-zero: differs from zero-ablation
    out = downstream(tiny, Oracle([0, 1, 2]), wins, [1], means, True, 2, progress=False)
    clean_resid = tiny.capture(ids)[:, :, 1]
    spliced = torch.where(keep[..., None], means[1].expand_as(clean_resid), clean_resid)  # the first position stays clean
    clean = torch.log_softmax(tiny.logits(ids)[:, :-1].float(), -1)
    logp = torch.log_softmax(tiny.logits_from(1, spliced, ids)[:, :-1].float(), -1)
    m = keep[:, :-1]  # scored: the predictions made at positions that count
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[m].mean().item()
    kl = (clean.exp() * (clean - logp)).sum(-1)[m].mean().item()
    assert out["ce_mean"][0] == pytest.approx(ce, rel=1e-5) and out["kl_mean"][0] == pytest.approx(kl, rel=1e-4)
    assert out["ce_mean"][0] != pytest.approx(out["ce_zero"][0], rel=1e-3)
    everywhere = torch.log_softmax(tiny.logits_from(1, means[1].expand_as(clean_resid), ids)[:, :-1].float(), -1)
    assert -everywhere.gather(-1, ids[:, 1:, None]).squeeze(-1)[m].mean().item() != pytest.approx(ce, rel=1e-6)


def test_paper_delta_ce_splices_and_scores_every_position(tiny):
    from mlsae.model import special_token_ids
    from mlsae.text import keep_mask

    wins = _windows(tiny, 2)
    ids = torch.stack(wins)
    keep = keep_mask(ids, special_token_ids(tiny.tokenizer), True)
    assert not keep.all()  # the first position (BOS) is left out by ours
    coder = Recorder([0, 1, 2], scale=0.5)
    out = downstream(tiny, coder, wins, [1], torch.zeros(3, 32), True, 2, progress=False, ablations=False,
                     paper_definitions=True)
    assert coder.calls == [int(keep.sum()), ids.numel()]  # ours codes the kept positions, the paper's every one
    # by hand: layer 1 halved at EVERY position, every next-token prediction scored
    clean = torch.log_softmax(tiny.logits(ids)[:, :-1].float(), -1)
    spliced = torch.log_softmax(tiny.logits_from(1, tiny.capture(ids)[:, :, 1] * 0.5, ids)[:, :-1].float(), -1)
    tgt = ids[:, 1:, None]
    ce_clean = -clean.gather(-1, tgt).mean().item()
    ce = -spliced.gather(-1, tgt).mean().item()
    kl = (clean.exp() * (clean - spliced)).sum(-1).mean().item()
    assert out["ce_clean_paper"][0] == pytest.approx(ce_clean, rel=1e-5)
    assert out["delta_ce_paper"][0] == pytest.approx(ce - ce_clean, rel=1e-4, abs=1e-6)
    assert out["kl_paper"][0] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert out["ce_clean"][0] != pytest.approx(ce_clean, rel=1e-6)  # ours scores fewer positions
    assert "ce_zero" not in out and "loss_recovered_zero" not in out


def test_splicing_matches_a_forward_that_replaces_only_that_layer(tiny):
    ids = torch.stack(_windows(tiny, 2))
    clean = tiny.capture(ids)
    layer = 1
    replaced = clean[:, :, layer] * 0.5
    seen = {}

    def replace(module, args, output):  # blocks return a tensor or (tensor, ...) by transformers version
        return (replaced,) + tuple(output[1:]) if isinstance(output, tuple) else replaced

    def record(i):
        def fn(module, args, output):
            seen[i] = _hidden(output).clone()
        return fn

    handles = [tiny.blocks[i].register_forward_hook(record(i)) for i in range(3)]
    h = tiny.blocks[layer].register_forward_hook(replace)
    reference = tiny.model(input_ids=ids).logits
    h.remove()
    for hd in handles:
        hd.remove()
    torch.testing.assert_close(seen[0], clean[:, :, 0], rtol=0, atol=0)  # the layer before is untouched
    torch.testing.assert_close(tiny.logits_from(layer, replaced, ids), reference, rtol=1e-5, atol=1e-5)


def _run(tmp_path, model, arch="mlsae", name="run"):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    cfg = TrainConfig(out=str(tmp_path / name), data=str(tmp_path / "t.jsonl"), arch=arch, expansion_factor=2, k=4,
                      tokens=384, tokens_per_step=64, micro_batch_tokens=64, lr=3e-3, ctx=24, device="cpu",
                      shuffle_buffer_mb=1)
    train(cfg, model=model)
    return tmp_path / name


def test_evaluate_end_to_end_and_compare(tmp_path, tiny):
    mlsae_run = _run(tmp_path, tiny, "mlsae", "m")
    per_layer = _run(tmp_path, tiny, "per-layer", "p")
    data = str(tmp_path / "t.jsonl")
    t1 = evaluate(mlsae_run, data, tokens=200, downstream_tokens=60, model=tiny, device="cpu", progress=False)
    t2 = evaluate(per_layer, data, tokens=200, downstream_tokens=60, model=tiny, device="cpu", progress=False)
    # no downstream budget given: a small evaluation stays small (min(4,000, tokens))
    evaluate(mlsae_run, data, tokens=50, model=tiny, device="cpu", progress=False, ablations=False, out=tmp_path / "small")
    assert json.loads((tmp_path / "small" / "eval.json").read_text())["downstream_tokens"] == 50
    assert t1.column("layer").to_pylist() == ["0", "1", "2", "mean"]
    for col in ("fvu", "fvu_standardized", "mse", "l0", "l1", "dead_fraction", "delta_ce", "kl", "ce_zero", "ce_mean",
                "loss_recovered_zero", "loss_recovered_mean"):
        vals = t1.column(col).to_pylist()
        assert all(v is None or np.isfinite(v) for v in vals), col
    assert all(0 < v <= 4 for v in t1.column("l0").to_pylist())
    assert pq.read_table(mlsae_run / "eval.parquet").equals(t1)
    summary = json.loads((mlsae_run / "eval.json").read_text())
    assert summary["tokens"] == 200
    side = compare({"m": t1, "p": t2})
    assert side.column_names == ["layer", "fvu[m]", "fvu[p]", "delta_ce[m]", "delta_ce[p]", "kl[m]", "kl[p]", "l0[m]", "l0[p]"]
    only = evaluate(mlsae_run, data, tokens=100, downstream_tokens=0, layers=[2], model=tiny, device="cpu",
                    out=tmp_path / "o", progress=False)
    assert only.column("layer").to_pylist() == ["2", "mean"] and only.column("fvu")[0] == only.column("fvu")[1]


def test_bad_input(tmp_path, tiny):
    with pytest.raises(MlsaeError, match="does not exist"):
        evaluate(tmp_path / "nope", "x", model=tiny)
    run = _run(tmp_path, tiny)
    with pytest.raises(MlsaeError, match=r"layer 7 was not trained in .* \(its layers: \[0, 1, 2\]\)"):
        evaluate(run, "x", layers=[1, 7], model=tiny)
    other = tiny_model("llama", n_layers=3, seed=9)
    write_cache(other, pack_windows(TEXT, other.tokenizer, 24), tmp_path / "c", tokens=50)
    with pytest.raises(MlsaeError, match="was tokenised and captured for another model"):
        evaluate(run, str(tmp_path / "c"), model=tiny)
    (run / "sae.safetensors").unlink()
    with pytest.raises(MlsaeError, match="is incomplete: no sae.safetensors"):
        evaluate(run, "x", model=tiny)


def test_downstream_reads_only_the_tokens_asked(tmp_path, tiny):
    """A small budget scores exactly that many positions, on a prefix of a window (causal: the
    same numbers as the full window at those positions)."""
    run = _run(tmp_path, tiny, "mlsae", "m")
    data = str(tmp_path / "t.jsonl")
    seen = []
    real = tiny.logits_from

    def spy(layer, residual, ids):
        seen.append(tuple(ids.shape))
        return real(layer, residual, ids)

    tiny.logits_from = spy
    try:
        t = evaluate(run, data, tokens=30, downstream_tokens=30, model=tiny, device="cpu", progress=False, ablations=False,
                     out=tmp_path / "small")
    finally:
        del tiny.logits_from
    assert json.loads((tmp_path / "small" / "eval.json").read_text())["downstream_tokens"] == 30
    assert sum(b * p for b, p in seen[:1]) <= 2 * 24 and all(p <= 24 for _, p in seen)  # ctx 24: at most 2 windows
    assert {p for _, p in seen} != {24}  # the last window was cut short
    assert np.isfinite(t.column("delta_ce").to_pylist()[-1])


def test_ablation_losses_are_measured_once_and_reused_exactly_for_the_same_model_text_and_means(tmp_path, tiny, monkeypatch):
    """Zero- and mean-ablation do not depend on the coder: a second run on the same text reuses
    them (a third of the splices) with identical numbers; other text or another model measures anew."""
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path / "user-cache"))
    first, second = _run(tmp_path, tiny, "mlsae", "m"), _run(tmp_path, tiny, "per-layer", "p")
    data = str(tmp_path / "t.jsonl")
    splices = []
    real = tiny.logits_from

    def counted(layer, residual, ids):
        splices.append(layer)
        return real(layer, residual, ids)

    monkeypatch.setattr(tiny, "logits_from", counted)
    kw = dict(tokens=120, downstream_tokens=60, model=tiny, device="cpu", progress=False)
    evaluate(first, data, **kw, out=tmp_path / "e1")
    full = len(splices)
    reused = evaluate(second, data, **kw, out=tmp_path / "e2")
    assert len(splices) - full == full // 3  # only the coder's own splices ran
    assert len(list((tmp_path / "user-cache" / "ablations").iterdir())) == 1
    splices.clear()
    fresh = evaluate(second, data, **kw, out=tmp_path / "e3", reuse_ablations=False)
    assert len(splices) == full
    for col in ("ce_zero", "kl_zero", "ce_mean", "kl_mean", "loss_recovered_zero", "loss_recovered_mean", "delta_ce"):
        assert reused.column(col).to_pylist() == fresh.column(col).to_pylist(), col
    splices.clear()
    (tmp_path / "other.jsonl").write_text("\n".join(json.dumps({"text": t.upper()}) for t in TEXT))
    evaluate(second, str(tmp_path / "other.jsonl"), **kw, out=tmp_path / "e4")  # other text: measured anew
    assert len(splices) == full
    splices.clear()
    other = tiny_model("llama", n_layers=3, seed=9)  # another model on the same text: measured anew
    from mlsae.evaluate import AblationBaselines

    wins = _windows(tiny)
    means = torch.zeros(3, 32)
    assert AblationBaselines(tiny, wins, [0, 1, 2], means, True, 2).path != AblationBaselines(other, wins, [0, 1, 2], means, True, 2).path
    assert AblationBaselines(tiny, wins, [0, 1, 2], means, True, 2).path != AblationBaselines(tiny, wins, [0, 1, 2], means + 1, True, 2).path
