"""``/docs``: Swagger UI for the OpenAPI schema, served from the package (FastAPI's own page
loads it from a CDN and is blank without internet). Its start-up script is a file too, so the
page needs no inline script."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from registry.server.ui import STATIC_URL

_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>registry API</title>
<link rel="icon" href="{STATIC_URL}/vendor/swagger-ui/favicon-32x32.png">
<link rel="stylesheet" href="{STATIC_URL}/vendor/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="/openapi.json"></div>
<script src="{STATIC_URL}/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="{STATIC_URL}/docs.js"></script>
</body>
</html>
"""


def create_docs_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return HTMLResponse(_PAGE)

    return router
