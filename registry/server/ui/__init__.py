"""The operator dashboard under ``/ui/``: page shells rendered from Jinja2 templates, and the
static files they load (our scripts and styles, and vendored Alpine.js and Chart.js).

The pages hold no data: their scripts read everything from ``/api`` with the ``X-API-Key``
header (the key is asked for once, when ``/api`` first refuses, and kept in the tab's
``sessionStorage``; it never goes into a URL), and follow ``/api/events`` for live changes.
So the shells and assets are served without the key, while every fact on a page is guarded
exactly as ``/api`` is. Every asset ships in the package: nothing is loaded from elsewhere.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HERE = Path(str(files(__name__)))
STATIC = HERE / "static"
#: URL prefix of the static files (the pages' scripts and styles, and /docs' Swagger UI).
STATIC_URL = "/ui/static"

#: The pages: path under /ui/, template, title in the navigation (None: not in it).
PAGES: dict[str, tuple[str, str | None]] = {
    "": ("overview.html", "Overview"),
    "clients": ("clients.html", "Clients"),
    "client": ("client.html", None),
    "sessions": ("sessions.html", "Sessions"),
    "session": ("session.html", None),
    "audit": ("audit.html", "Audit"),
}

#: No inline script or style, nothing from another origin, no framing, no plugins.
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: Swagger UI sets style attributes on its elements, so /docs allows inline styles (never
#: inline scripts).
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


class SecurityHeaders:
    """ASGI middleware: a Content-Security-Policy and related headers on every HTTP answer
    under ``/ui`` and ``/docs`` (the only routes that serve HTML)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/ui", "/docs")):
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if path.startswith("/docs") else UI_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", policy.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def create_ui_router() -> APIRouter:
    """The page routes (GET only: the pages change nothing; what they show comes from /api)."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    nav = [(path, title) for path, (_, title) in PAGES.items() if title is not None]

    def page(path: str, template: str) -> None:
        async def render(request: Request) -> HTMLResponse:
            html = _templates.get_template(template).render(
                static=STATIC_URL, nav=nav, current=path
            )
            return HTMLResponse(html, headers={"Cache-Control": "no-store"})

        router.add_api_route(f"/{path}", render, methods=["GET"], name=f"ui:{path or 'overview'}")

    for path, (template, _) in PAGES.items():
        page(path, template)
    return router


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app``: its pages, its static files and its security headers."""

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.include_router(create_ui_router())
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(SecurityHeaders)
