"""The app factory: ``create_app(settings)`` wires the registry, the session runner, ``/ws`` and
``/api``. Nothing connects until the app's lifespan starts."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.importer import ImportFromStringError, import_from_string

from registry.errors import InvalidArgumentError, StoreUnavailableError
from registry.registry import Registry
from registry.server import redaction, ui
from registry.server.api import API_ERRORS, create_router, require_api_key
from registry.server.docs import create_docs_router
from registry.server.events import EventFeed, create_events_router
from registry.server.fleet_api import create_fleet_router
from registry.server.history_api import create_history_router
from registry.server.metrics import Metrics
from registry.server.sessions import SessionManager, SessionRunner
from registry.server.ws import Endpoint
from registry.settings import Settings

logger = logging.getLogger(__name__)


class _ClientFaultsAreWarnings(logging.Filter):
    """uvicorn logs a text frame that is not valid UTF-8 at ERROR, with a traceback, and closes
    the connection with 1007. Any client can send one, at will: it is the client's fault, not
    the server's, so it is logged as a one-line warning instead."""

    MESSAGES = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if (
            record.levelno >= logging.ERROR
            and isinstance(message, str)
            and message in self.MESSAGES
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_CLIENT_FAULTS = _ClientFaultsAreWarnings()


def load_runner(import_string: str) -> SessionRunner:
    """Instantiate the runner class named by ``package.module:Class``."""
    try:
        factory = import_from_string(import_string)
    except ImportFromStringError as exc:
        raise InvalidArgumentError("runner", str(exc)) from exc
    runner: SessionRunner = factory()
    return runner


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    runner = load_runner(settings.runner)
    logging.getLogger("uvicorn.error").addFilter(_CLIENT_FAULTS)  # a no-op when already added
    redaction.install()  # no credential in uvicorn's log lines

    registry = Registry(
        settings.database_url,
        on_duplicate=settings.on_duplicate,
        node_name=settings.node_name or f"{socket.gethostname()}:{settings.port}",
        auto_migrate=settings.auto_migrate,
        heartbeat_interval=settings.heartbeat_interval,
        node_timeout=settings.node_timeout,
        journal_limit=settings.journal_limit,
        journal_limit_bytes=settings.journal_limit_bytes,
        stall_timeout=settings.store_timeout,
        max_metadata_bytes=settings.max_metadata_bytes,
        max_device_info_bytes=settings.max_device_info_bytes,
    )
    # A SQLite database that another registry serves: refused here, before anything starts
    # (``registry serve`` says so in one line); the lock taken by start() decides a race.
    registry.ensure_free()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        sessions = SessionManager(
            registry, runner, settings.command_timeout, settings.store_timeout
        )
        endpoint = Endpoint(settings, registry, sessions)
        endpoint.start()
        events = EventFeed(registry.history)
        registry.journal.listeners.append(events.poke)
        events.start()
        app.state.events = events
        app.state.registry = registry
        app.state.sessions = sessions
        app.state.metrics = Metrics(registry)
        app.state.endpoint = endpoint
        logger.info("registry serving on node %s (%s)", registry.node_id, registry.database_url)
        try:
            yield
        finally:
            await events.close()
            await endpoint.close()
            await sessions.close()
            await registry.close()

    # /docs is served from the package (registry.server.docs); ReDoc would need a CDN.
    app = FastAPI(title="registry", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts())
    app.include_router(create_router())
    app.include_router(create_history_router())
    app.include_router(create_events_router())
    app.include_router(create_fleet_router())
    app.include_router(create_docs_router())
    ui.install(app)

    @app.exception_handler(InvalidArgumentError)
    async def invalid_argument(request: Request, exc: InvalidArgumentError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        """A history query the store did not answer: 503, as /api/health says, not a 500."""
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    metrics_guard = [] if settings.metrics_open else [Depends(require_api_key)]

    @app.get(
        "/metrics",
        dependencies=metrics_guard,
        response_class=Response,
        responses={} if settings.metrics_open else {401: API_ERRORS[401]},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this node, in the text exposition format."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        endpoint: Endpoint = websocket.app.state.endpoint
        await endpoint(websocket)

    return app
