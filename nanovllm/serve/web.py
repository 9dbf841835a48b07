"""The built-in web pages: `GET /` (chat) and `GET /dashboard` (live metrics), assets under `/ui/`.

Plain HTML/CSS/JS from nanovllm/serve/static (package data; no build step, nothing fetched
from elsewhere). The pages and their assets load without the API key; every data call they
make (/v1/*) carries the key, which the browser keeps in sessionStorage, so the API's own
rules protect the data. `--no-web-ui` leaves all of this out.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

from nanovllm.serve.protocol import error_body

STATIC_DIR = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/dashboard": "dashboard.html"}
ASSET_PREFIX = "/ui/"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Scripts and styles only from this server, no inline script: even a renderer bug could not
# run injected markup. connect-src 'self' keeps the data calls on this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_web_path(path: str) -> bool:
    """Paths of the pages and their assets: served without the API key."""
    return path in PAGES or path.startswith(ASSET_PREFIX)


def add_web_ui(app: FastAPI) -> None:
    """Add the chat page, the dashboard and their static assets to `app`."""
    # a fixed set of flat files, looked up by name: no path from the URL reaches the filesystem
    assets = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}

    def serve(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            return JSONResponse(error_body(f"no file `{name}` in the web UI", HTTPStatus.NOT_FOUND),
                                status_code=HTTPStatus.NOT_FOUND)
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    def page(name: str):
        async def endpoint() -> Response:  # no parameters: nothing from the query string
            return serve(name)
        return endpoint

    for route, name in PAGES.items():
        app.add_api_route(route, page(name), methods=["GET"], include_in_schema=False)

    @app.get(ASSET_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return serve(name)
