"""The page at ``/`` to try the model in a browser: static files, same-origin scripts only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["add_page", "PAGE_HEADERS"]

STATIC = Path(__file__).parent / "static"
FILES = {  # route -> (file in static/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
}
# Scripts, styles and requests from this origin only; images drawn from the picked file (blob:).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _endpoint(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    """An endpoint without parameters answering ``content``."""

    async def send_file() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return send_file


def add_page(app: FastAPI) -> None:
    """Serve the page's files (read once) with a strict Content-Security-Policy."""
    for route, (name, media_type) in FILES.items():
        endpoint = _endpoint((STATIC / name).read_bytes(), media_type)
        app.add_api_route(route, endpoint, methods=["GET"], include_in_schema=False)
