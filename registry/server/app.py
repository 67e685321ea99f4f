"""The app factory: ``create_app(settings)`` wires the registry, the session runner, ``/ws`` and
``/api``. Nothing connects until the app's lifespan starts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.importer import ImportFromStringError, import_from_string

from registry.errors import InvalidArgumentError
from registry.registry import Registry
from registry.server.api import create_router
from registry.server.sessions import SessionManager, SessionRunner
from registry.server.ws import Endpoint
from registry.settings import Settings

logger = logging.getLogger(__name__)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(
            settings.database_url,
            on_duplicate=settings.on_duplicate,
            node_name=settings.node_name,
            auto_migrate=settings.auto_migrate,
            heartbeat_interval=settings.heartbeat_interval,
            node_timeout=settings.node_timeout,
        )
        await registry.start()
        sessions = SessionManager(registry, runner, settings.command_timeout)
        endpoint = Endpoint(settings, registry, sessions)
        app.state.registry = registry
        app.state.sessions = sessions
        app.state.endpoint = endpoint
        logger.info("registry serving on node %s (%s)", registry.node_id, registry.database_url)
        try:
            yield
        finally:
            await sessions.close()
            await registry.close()

    app = FastAPI(title="registry", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts())
    app.include_router(create_router())

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        endpoint: Endpoint = websocket.app.state.endpoint
        await endpoint(websocket)

    return app
