"""The explorer's pages in a real browser: headless Chromium (Debian's package) driven by Playwright.

Each test loads a page from a server running in this process, clicks as a researcher would and
checks that the charts drew their marks. Skipped with a reason where no Chromium is installed
(scripts/setup.sh installs Debian's package when CI=true)."""

import re
import shutil

import pytest

from mlsae.serve import in_background

playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Debian's chromium (scripts/setup.sh installs it when CI=true)")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(explorer_runs):
    with in_background([explorer_runs[n] for n in ("mlsae", "concat", "per-layer", "bare")]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no script on any page threw


def test_the_overview_draws_its_charts_and_a_click_leads_to_a_latent(page, site):
    page.goto(f"{site}/runs/mlsae")
    page.wait_for_selector("#latent-table tbody tr")
    assert page.locator("#evaluation table:not(#compare) tbody tr").count() == 4  # three layers and the mean
    assert page.locator("#compare").count() == 1  # the concat run beside it
    assert page.locator("#drift-chart polyline.line").count() == 2
    assert page.locator("#heatmap-chart rect.cell").count() > 3 * 10
    assert page.locator("#error").is_hidden()
    # sort by a column: the URL keeps the state, the table follows
    page.click("#latent-table th:has-text('mean_layer')")
    page.wait_for_url(re.compile(r"sort=mean_layer"))
    page.wait_for_function("document.querySelector('#latent-table th.sorted')?.textContent === 'mean_layer'")
    first = page.locator("#latent-table tbody tr a.latent-link").first
    target = first.get_attribute("href")
    first.click()
    page.wait_for_url(f"**{target}")
    page.wait_for_selector("#examples .example")
    assert page.locator("h1").inner_text().startswith("Latent ")


def test_a_heatmap_column_filters_the_latent_table(page, site):
    page.goto(f"{site}/runs/mlsae")
    page.wait_for_selector("#latent-table tbody tr")
    page.locator("#heatmap-chart rect.cell").nth(5).click()
    page.wait_for_url(re.compile(r"mean_layer_min="))
    page.wait_for_function("document.querySelector('#page-info').textContent.includes(' of ')")
    lo, hi = float(page.locator("#mean_layer_min").input_value()), float(page.locator("#mean_layer_max").input_value())
    column = [h.inner_text() for h in page.locator("#latent-table th").all()].index("mean_layer")
    listed = [float(r.locator("td").nth(column).inner_text()) for r in page.locator("#latent-table tbody tr").all()]
    assert listed and all(lo - 1e-3 <= v <= hi + 1e-3 for v in listed)  # the column's latents, by their (rounded) mean layer


def test_a_latent_page_draws_its_profile_histogram_examples_and_nearest(page, site):
    page.goto(f"{site}/runs/mlsae/latents/3")
    page.wait_for_selector("#examples .example")
    assert page.locator("#distribution-chart rect.bar").count() == 3  # the three captured layers
    assert page.locator("#histogram-chart rect.bar").count() > 0
    assert page.locator("#examples .example .hit").count() == page.locator("#examples .example").count()  # every example highlights its token
    assert page.locator("#nearest a.latent-link").count() == 10
    assert page.locator("#example-list h3").count() == 3  # the three strongest layers first
    page.select_option("#example-layer", index=2)  # one layer
    assert page.locator("#example-list h3").count() == 1
    page.locator("#nearest a.latent-link").first.click()
    page.wait_for_url(re.compile(r"/runs/mlsae/latents/\d+$"))
    page.wait_for_selector("#nearest a.latent-link")


def test_a_concat_latent_shows_block_norms_and_a_bank_latent_its_layer(page, site):
    page.goto(f"{site}/runs/concat/latents/7")
    page.wait_for_selector("#profile-chart rect.bar")
    assert page.locator("#profile-chart rect.bar").count() == 2 * 3  # encoder and decoder at three layers
    page.wait_for_selector("#example-list .example")
    assert page.locator("#example-layer").count() == 0  # one joint code per token: one list, not one per layer
    page.goto(f"{site}/runs/per-layer")
    page.wait_for_selector("#latent-table tbody tr a.latent-link")
    link = page.locator("#latent-table tbody tr a.latent-link").first
    assert "?layer=" in link.get_attribute("href")
    link.click()
    page.wait_for_selector("#examples")
    assert "dictionary" in page.locator("h1").inner_text()


def test_a_prompt_is_coded_and_a_latent_clicked_through(page, site):
    page.goto(f"{site}/runs/mlsae/prompt")
    page.fill("#text", "the library reads files")
    page.click("#code")
    page.wait_for_url(re.compile(r"\?text=the\+library"))
    page.wait_for_selector("#token-heatmap rect.cell", timeout=60_000)
    assert page.locator("#prompt-heatmap rect.cell").count() > 0
    assert page.locator("#tokens span.counted").count() == 23  # every character; BOS, the first position, is left out
    page.locator("#tokens span.counted").nth(4).click()
    page.wait_for_function("document.querySelector('#token-detail h2').textContent.startsWith('Token 5')")
    assert "token=5" in page.url
    shared = page.url  # the address of this view opens it again on the same token
    page.goto(shared)
    page.wait_for_function("document.querySelector('#token-detail h2')?.textContent.startsWith('Token 5')", timeout=60_000)
    link = page.locator("#token-detail table a.latent-link").first
    href = link.get_attribute("href")
    link.click()
    page.wait_for_url(f"**{href}")
    page.wait_for_selector("#examples")


def test_errors_show_on_the_page(page, site):
    page.goto(f"{site}/runs/mlsae/latents/999")
    page.wait_for_selector("#error:not([hidden])")
    assert "latent 999 does not exist" in page.locator("#error").inner_text()
    page.goto(f"{site}/runs/bare")
    page.wait_for_selector("#latents .note")
    assert "mlsae analyze" in page.locator("#latents .note").inner_text()
    page.goto(f"{site}/runs/mlsae/prompt?text=" + "x" * 40)
    page.wait_for_selector("#error:not([hidden])")
    assert "longer than the context (24)" in page.locator("#error").inner_text()


def test_the_runs_index_links_every_run(page, site):
    page.goto(site)
    page.wait_for_selector("a.run-link")
    assert page.locator("a.run-link").all_inner_texts() == ["mlsae", "concat", "per-layer", "bare"]
