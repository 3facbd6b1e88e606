"""The analyse -> report chain on a tiny model, and the page rendered in headless Chromium."""

import json
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from conftest import tiny_model
from mlsae.analyze import analyze
from mlsae.config import TrainConfig
from mlsae.errors import MlsaeError
from mlsae.evaluate import evaluate
from mlsae.report import build_report
from mlsae.train import train

TEXT = [f"Paragraph {i}: the library reads files, parses {i % 11} records and writes tables." for i in range(200)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    model = tiny_model("gpt2", n_layers=3, seed=4)
    (folder / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    cfg = TrainConfig(out=str(folder / "run"), data=str(folder / "t.jsonl"), expansion_factor=2, k=4, tokens=384,
                      tokens_per_step=64, micro_batch_tokens=64, lr=3e-3, ctx=24, device="cpu", shuffle_buffer_mb=1)
    train(cfg, model=model)
    return folder, model


def test_report_without_evaluation_or_analysis_says_what_to_run(run, tmp_path):
    folder, _ = run
    page = build_report(folder / "run", tmp_path / "r")
    text = page.read_text()
    assert "No evaluation yet: run <code>mlsae eval" in text and "No analysis yet: run <code>mlsae analyze" in text


def test_analyze_writes_tables_without_nan(run):
    folder, model = run
    with pytest.raises(MlsaeError, match="no --data given"):
        analyze(folder / "run", None, model=model)
    with pytest.raises(MlsaeError, match="longer than the context"):
        analyze(folder / "run", str(folder / "t.jsonl"), tokens=100, model=model, device="cpu", progress=False,
                prompts=["x" * 100])
    summary = analyze(folder / "run", str(folder / "t.jsonl"), tokens=300, model=model, device="cpu", progress=False,
                      prompts=["the library reads"])
    out = folder / "run" / "analysis"
    for name in ("drift", "latents", "layer_distribution", "n_layers", "examples", "examples_preview", "geometry_bins",
                 "geometry_sample", "heatmaps"):
        table = pq.read_table(out / f"{name}.parquet")
        for col in table.column_names:
            if table.schema.field(col).type in ("double", "float"):
                vals = [v for v in table.column(col).to_pylist() if v is not None]
                assert all(v == v for v in vals), f"NaN in {name}.{col}"
    assert summary["n_tokens"] == 300 and 0 < summary["drift"]["mean_cosine"] <= 1
    assert json.loads((out / "summary.json").read_text())["layers"]["n_latents"] == 64
    lat = pq.read_table(out / "latents.parquet")
    dead = lat.column("dead").to_pylist()
    assert all((m is None) == d for m, d in zip(lat.column("mean_layer").to_pylist(), dead))  # empty latents: null


def test_report_renders_every_figure_in_headless_chromium(run, tmp_path):
    folder, model = run
    evaluate(folder / "run", str(folder / "t.jsonl"), tokens=200, downstream_tokens=40, model=model, device="cpu",
             progress=False)
    analyze(folder / "run", str(folder / "t.jsonl"), tokens=300, model=model, device="cpu", progress=False,
            prompts=["the library reads files"])
    page = build_report(folder / "run")
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert set(images) == {"training.png", "evaluation.png", "drift.png", "layer_distribution.png", "variances.png", "geometry.png",
                           "heatmap_0.png"}
    for img in images:
        assert (page.parent / img).stat().st_size > 5000
    assert "<mark>" in text and "Variance of a latent" in text
    assert "Input transforms: standardize, center_layers; b_pre start: geometric median" in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless check needs Debian's chromium (scripts/setup.sh installs it when CI=true)")
    # Count the images that decoded: the page's script writes the result into the DOM we dump.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load', () => {"
                     "const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;"
                     "document.title = 'loaded ' + ok + ' of ' + document.images.length; });</script></body>"))
    for img in images:
        shutil.copy(page.parent / img, tmp_path / img)
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert f"<title>loaded {len(images)} of {len(images)}</title>" in dom


def test_a_corrupted_table_is_named_and_refused_by_the_report(run, tmp_path):
    folder, model = run
    copy = tmp_path / "run"
    shutil.copytree(folder / "run", copy)
    evaluate(copy, str(folder / "t.jsonl"), tokens=100, downstream_tokens=0, model=model, device="cpu", progress=False)
    analyze(copy, str(folder / "t.jsonl"), tokens=100, model=model, device="cpu", progress=False)
    listed = json.loads((copy / "analysis" / "checksums.json").read_text())
    assert {"latents.parquet", "summary.json"} <= set(listed)
    build_report(copy)  # intact: fine
    table = copy / "analysis" / "latents.parquet"
    table.write_bytes(table.read_bytes()[:-10])
    with pytest.raises(MlsaeError, match=r"latents.parquet is corrupted or truncated .*: run `mlsae analyze` again"):
        build_report(copy)
    table.unlink()
    shutil.copy(folder / "run" / "config.json", copy / "config.json")
    (copy / "eval.parquet").write_bytes(b"PAR1 not a table")
    with pytest.raises(MlsaeError, match=r"eval.parquet is corrupted or truncated .*: run `mlsae eval` again"):
        build_report(copy)
