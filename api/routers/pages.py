"""Pages for people: `/` (links), `/docs` (Swagger UI, offline), and the static pages.

Swagger UI's assets come from the `fastapi-offline` package, served by this process: `/docs`
works without internet (FastAPI's default loads them from a CDN). The static pages hold no
secret: their data comes from the /v1 routes, with the key the user types in (the demo's
keys excepted, which is why /demo is on only when they are set).

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import html
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from cartwise.settings import Settings

log = logging.getLogger("cartwise.api")
STATIC = Path(__file__).parent.parent / "static"
SWAGGER = "/docs-assets"
# Static page folders, mounted when present: (path, folder, what the link says).
PAGES = [("/demo", "demo", "Demo storefront"), ("/inspect", "inspect", "Inspect lists (admin)"),
         ("/experiments", "experiments", "Experiments (admin)"),
         ("/widget", "widget", "Storefront widget script")]


def swagger_assets() -> Path | None:
    """Swagger UI's files as the fastapi-offline package ships them, if installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def mounted(settings: Settings) -> list[tuple[str, str, str]]:
    """The static pages this process serves: the demo only with its keys."""
    demo = bool(settings.demo_read_key and settings.demo_ingest_key)
    return [(path, folder, label) for path, folder, label in PAGES
            if (STATIC / folder).is_dir() and (path != "/demo" or demo)]


def index_html(pages: list[tuple[str, str, str]]) -> str:
    links = [(f"{p}/", label) for p, _, label in pages if p != "/widget"]
    links += [("/docs", "API reference (Swagger UI)"), ("/openapi.json", "OpenAPI document")]
    items = "\n".join(f'    <li><a href="{html.escape(href)}">{html.escape(label)}</a></li>'
                      for href, label in links)
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>cartwise</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}}
a{{color:#0b5cad}}</style></head>
<body>
  <h1>cartwise</h1>
  <p>Live "you may also need" suggestions. Pages and references of this API:</p>
  <ul>
{items}
  </ul>
  <p>Admin pages ask for an admin key and keep it in this tab only.</p>
</body>
</html>
"""


def router(settings: Settings) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    pages = mounted(settings)
    page = index_html(pages)

    @r.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    assets = swagger_assets()

    @r.get("/docs", response_class=HTMLResponse)
    async def docs() -> HTMLResponse:
        if assets is None:  # FastAPI's page, from the CDN: works online only
            return get_swagger_ui_html(openapi_url="/openapi.json", title="cartwise API")
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="cartwise API",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon.png")

    if settings.demo_read_key and settings.demo_ingest_key:
        @r.get("/demo/config.json")
        async def demo_config() -> dict[str, str]:
            return {"read_key": settings.demo_read_key, "ingest_key": settings.demo_ingest_key,
                    "currency": "GBP"}  # the replayed shop's prices (docs/demo-data.md)

    return r


def mount(app: FastAPI, settings: Settings) -> None:
    """Static folders and Swagger UI's assets (after the routes: /demo/config.json first)."""
    assets = swagger_assets()
    if assets is not None:
        app.mount(SWAGGER, StaticFiles(directory=assets), name="docs-assets")
    else:
        log.warning("fastapi-offline is not installed: /docs loads Swagger UI from a CDN")
    for path, folder, _ in mounted(settings):
        app.mount(path, StaticFiles(directory=STATIC / folder, html=True), name=folder)
