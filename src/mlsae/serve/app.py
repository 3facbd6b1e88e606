"""The explorer's web layer: pages (static HTML that draws itself from the JSON API) and the API.

Every view has a stable address that can be shared:

    /                                   the served runs
    /runs/{run}                         overview (eval table, drift, layer heatmap, latent table)
    /runs/{run}/latents/{latent}        one latent (a per-layer run adds ?layer=L, its dictionary)
    /runs/{run}/prompt?text=...         a text coded at every token and layer

and the JSON behind each page lives under ``/api/``. A question a run cannot answer is a 4xx
(or 503: the run's model cannot be loaded) with ``{"detail": "<one line>"}``; the server goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .explorer import RANGE_FILTERS, SORTABLE, ModelShelf, ServedRun, Unanswerable

STATIC = Path(__file__).parent / "static"
MAX_TEXT_CHARS = 20_000  # longer text is refused before tokenising (the context limit is checked in tokens)


def run_names(folders: Sequence[str | Path]) -> list[str]:
    """A short, unique, URL-safe name per run: its folder's name (``-2``, ``-3`` ... on a clash)."""
    names: list[str] = []
    for folder in folders:
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(folder).resolve().name) or "run"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def create_app(folders: Sequence[str | Path], device: str = "cpu", allowed_hosts: Optional[Sequence[str]] = None) -> FastAPI:
    """The explorer over ``folders`` (each a finished run; refused here, before serving, if not).
    ``allowed_hosts``: the Host headers answered (a loopback server names its own, so that a web
    page cannot reach it through a hostname that resolves to 127.0.0.1); None answers any."""
    shelf = ModelShelf(device)
    runs = {name: ServedRun(name, folder, shelf) for name, folder in zip(run_names(folders), folders)}
    app = FastAPI(title="mlsae explorer", docs_url="/api/docs", openapi_url="/api/openapi.json")
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.state.runs = runs
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(Unanswerable)
    async def unanswerable(_request: Request, e: Unanswerable):
        return JSONResponse({"detail": e.message}, status_code=e.status)

    def get(name: str) -> ServedRun:
        if name not in runs:
            raise Unanswerable(404, f"run {name!r} is not served here; served: {', '.join(runs)}")
        return runs[name]

    shell = (STATIC / "page.html").read_text()  # every page is this shell and its own script

    def page(script: str, name: Optional[str] = None):
        if name is not None:
            get(name)  # an unknown run is a 404, not an empty page
        return HTMLResponse(shell.replace("{page}", script))

    # --- pages -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse(f"/runs/{next(iter(runs))}") if len(runs) == 1 else page("index")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/runs/{name}", include_in_schema=False)
    def overview_page(name: str):
        return page("overview", name)

    @app.get("/runs/{name}/latents/{latent}", include_in_schema=False)
    def latent_page(name: str, latent: int):
        return page("latent", name)

    @app.get("/runs/{name}/prompt", include_in_schema=False)
    def prompt_page(name: str):
        return page("prompt", name)

    # --- API -----------------------------------------------------------------------------------

    @app.get("/api/runs")
    def list_runs() -> list[dict]:
        return [run.info() for run in runs.values()]

    @app.get("/api/runs/{name}/overview")
    def overview(name: str) -> dict:
        run = get(name)
        out = run.overview()
        out["compare"], out["not_compared"] = [], []
        for other in runs.values():
            if other is run:
                continue
            if other.layers != run.layers:
                out["not_compared"].append({"run": other.name, "why": f"it reads layers {other.layers}"})
            elif (table := other.evaluation()) is None:
                out["not_compared"].append({"run": other.name, "why": "it has no evaluation yet"})
            else:
                out["compare"].append({"run": other.name, "eval": table})
        return out

    @app.get("/api/runs/{name}/latents")
    def latent_table(
        name: str,
        sort: str = Query("latent", description=f"one of {', '.join(SORTABLE)}"),
        descending: bool = False,
        offset: int = Query(0, ge=0, le=2**62),
        limit: int = Query(50, ge=1, le=500),
        live_only: bool = False,
        trigger_layer: Optional[int] = None,
        dictionary_layer: Optional[int] = None,
        mean_layer_min: Optional[float] = None, mean_layer_max: Optional[float] = None,
        layer_variance_min: Optional[float] = None, layer_variance_max: Optional[float] = None,
        variance_ratio_min: Optional[float] = None, variance_ratio_max: Optional[float] = None,
        activation_rate_min: Optional[float] = None, activation_rate_max: Optional[float] = None,
    ) -> dict:
        bounds = locals()
        ranges = {f: (bounds[f"{f}_min"], bounds[f"{f}_max"]) for f in RANGE_FILTERS}
        return get(name).latent_table(sort, descending, offset, limit, live_only, ranges, trigger_layer, dictionary_layer)

    # The two large answers go out as they are (plain dicts of plain values: nothing to validate).
    @app.get("/api/runs/{name}/latents/{latent}")
    def latent(name: str, latent: int, layer: Optional[int] = None, examples: int = Query(5, ge=1, le=50)) -> JSONResponse:
        return JSONResponse(get(name).latent(latent, layer, examples))

    @app.get("/api/runs/{name}/prompt")
    def prompt(name: str, text: str = Query(..., max_length=MAX_TEXT_CHARS)) -> JSONResponse:
        return JSONResponse(get(name).prompt(text))

    return app
