"""The dashboard: a static web page served by the REST service at ``/``.

The page (``api/static/``: index.html, app.js, app.css and the vendored uPlot charting
library) ships in the package; there is no build step and no CDN. It reads the same REST
endpoints as everyone else, with the same permissions: the page itself and its assets
are public (they hold no data and no secret), the data needs a reader token wherever
reads do (the page asks for it and keeps it in the tab's sessionStorage).

Headers on the page: a Content-Security-Policy that allows scripts, styles and requests
to this origin only (no inline script, no eval, no framing), no MIME sniffing, no
referrer.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: scripts, styles, images and fetches from this origin only; nothing inline, no framing
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class _StaticFiles(StaticFiles):
    """Static assets with `SECURITY_HEADERS` (nosniff matters for scripts)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static/`` (not in the OpenAPI schema)."""

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        """The dashboard page (static HTML; data comes from the REST endpoints)."""
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
