"""The web explorer (``mlsae serve``): a local FastAPI app over runs' tables and, on request,
the live model and coder. :mod:`.explorer` answers the questions, :mod:`.app` puts them on
the web, ``static/`` holds the pages (plain HTML and JavaScript, no build step)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..errors import MlsaeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_names(host: str) -> Optional[list[str]]:
    """The Host headers a loopback server answers (None for another address: it answers any)."""
    return ["127.0.0.1", "localhost", "[::1]"] if host in LOOPBACK else None


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """Serve ``runs`` until interrupted. Every run is opened (and refused, with its reason) before
    the server starts; the model loads on the first prompt."""
    import uvicorn

    from .app import create_app

    if not runs:
        raise MlsaeError("mlsae serve: expected at least one run folder")
    check_port(host, port)
    for folder in runs:
        print(f"opening {folder}", flush=True)
    app = create_app(runs, device=device, allowed_hosts=loopback_names(host))
    if host not in LOOPBACK:
        print(f"warning: serving on {host}, not loopback: anyone who reaches this address can read the runs (there is no login)")
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {len(app.state.runs)} run(s) at http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    threading.Thread(target=warm_up, args=(app.state.runs.values(),), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")


def warm_up(runs) -> None:
    """Load what the first latent page of each analysed run needs (its coder, its tokenizer) while
    the user finds the page; the language model still loads on the first prompt."""
    for run in runs:
        if not run.analysed:
            continue
        try:
            run.coder()
            run.shelf.tokens(run.meta["model"])
            print(f"ready: the latent pages of {run.name}", flush=True)
        except Exception as e:  # the page that needs it will say why; the server goes on
            print(f"warning: could not prepare {run.name}'s latent pages: {e}", flush=True)


def check_port(host: str, port: int) -> None:
    """The address can be listened on (checked before any run is opened)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise MlsaeError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pass another --port") from None


@contextlib.contextmanager
def in_background(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 0, device: str = "cpu") -> Iterator[str]:
    """The explorer served from a thread of this process (a notebook, a test, a load test) while
    the block runs; yields its base URL. ``port=0`` takes a free port."""
    import uvicorn

    from .app import create_app

    app = create_app(runs, device=device, allowed_hosts=loopback_names(host))
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MlsaeError(f"the explorer did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
