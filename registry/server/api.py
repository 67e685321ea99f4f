"""The HTTP API that existing tools expect (docs/protocol.md), under ``/api``.

Every route answers from memory, none waits on a client, and only ``/api/dispatch`` waits on
the database: it records the dispatched session before it answers (at most ``store_timeout``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, BaseModel

from registry.errors import InvalidArgumentError, StoreUnavailableError
from registry.registry import Registry
from registry.server.sessions import SessionManager
from registry.server.ws import STORE_BEHIND, sanitise_task_name, token_matches
from registry.types import ClientType
from registry.validation import storable_text

logger = logging.getLogger(__name__)

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class ErrorDetail(BaseModel):
    """The body of an error answer."""

    detail: str


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    """FastAPI's answer to a request that does not match the route's parameters."""

    detail: list[ValidationProblem]


#: The error answers every ``/api`` route may give, for the OpenAPI schema. A 422 is either
#: FastAPI's own (parameters of the wrong shape) or the registry's (a value it refuses, such as
#: a cursor it did not issue), whose detail is one string.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "Missing or wrong X-API-Key"},
    422: {"model": ErrorDetail | ValidationErrors, "description": "Invalid parameters"},
}
BAD_REQUEST: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "Empty or unsafe fields"}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "Not found"}
}
STORE_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorDetail, "description": "The store did not answer"}
}
TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorDetail, "description": "The device runs its limit of sessions"}
}


def _storable(value: str) -> str:
    problem = storable_text(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A string path or query parameter of an ``/api`` route (an id or a filter): one that no
#: backend could store or compare (a NUL, a lone surrogate) is refused with a 422 naming the
#: parameter before anything looks it up, so it can never fail in the store as an outage.
Text = Annotated[str, AfterValidator(_storable)]


class DispatchRequest(BaseModel):
    client_id: str | None = None
    request: str | None = None
    task_name: str | None = None


def require_api_key(request: Request, key: str | None = Depends(_api_key_header)) -> None:
    """401 unless the ``X-API-Key`` header matches the configured key (if any)."""
    expected: str | None = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None:
        raise HTTPException(status_code=401, detail="Missing API key (X-API-Key header)")
    if not token_matches(key, expected):
        raise HTTPException(status_code=401, detail="Invalid API key")


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _sessions(request: Request) -> SessionManager:
    sessions: SessionManager = request.app.state.sessions
    return sessions


RegistryDep = Annotated[Registry, Depends(_registry)]
SessionsDep = Annotated[SessionManager, Depends(_sessions)]


def _online(registry: Registry) -> list[str]:
    return [info.client_id for info in registry.get_all_clients()]


def create_router() -> APIRouter:
    """The ``/api`` routes; they find the registry and sessions on ``app.state``."""
    router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], responses=API_ERRORS)

    @router.get("/clients")
    async def list_clients(
        registry: RegistryDep,
        client_type: Annotated[
            ClientType | None, Query(alias="type", description="Only devices or constellations.")
        ] = None,
        platform: Annotated[
            Text | None, Query(description="Only this platform (any case).")
        ] = None,
        detail: Annotated[bool, Query(description="Also each client's live info.")] = False,
    ) -> dict[str, Any]:
        """Ids of the clients connected to this node (``type`` and ``platform`` narrow the
        list); with ``detail=true`` also each one's info and this node's id."""
        if platform is not None:
            infos = [
                info
                for info in registry.get_clients_by_platform(platform)
                if client_type is None or info.client_type is client_type
            ]
        elif client_type is not None:
            infos = registry.get_clients_by_type(client_type)
        else:
            infos = registry.get_all_clients()
        answer: dict[str, Any] = {"online_clients": [info.client_id for info in infos]}
        if detail:
            answer["clients"] = [
                {
                    "client_id": info.client_id,
                    "client_type": info.client_type.value,
                    "platform": info.platform,
                    "metadata": info.metadata,
                    "connected_at": datetime.fromtimestamp(info.connect_time, UTC).isoformat(),
                    "node_id": registry.node_id,
                }
                for info in infos
            ]
        return answer

    @router.get(
        "/health",
        response_model=None,
        responses={503: {"description": "``degraded``: the store is not keeping up"}},
    )
    async def health(registry: RegistryDep) -> dict[str, Any] | JSONResponse:
        """``healthy`` while the store keeps up; ``degraded`` (503) while commits fail or stall
        or the journal is full, with the reason and the journal's depth and limit."""
        journal = registry.journal
        fault = journal.fault()
        if fault is not None:
            return JSONResponse(
                status_code=503,
                content={
                    "status": "degraded",
                    "error": fault,
                    "journal_depth": journal.depth,
                    "journal_limit": journal.limit,
                    "online_clients": _online(registry),
                },
            )
        return {"status": "healthy", "online_clients": _online(registry)}

    @router.post("/dispatch", responses=BAD_REQUEST | NOT_FOUND | TOO_MANY | STORE_DOWN)
    async def dispatch(
        body: DispatchRequest, request: Request, registry: RegistryDep, sessions: SessionsDep
    ) -> dict[str, str]:
        """Dispatch ``request`` to a connected device: record a session owned and run by the
        device (answered once it is durable), and send the device a ``task`` frame. The
        session runs once the device takes it up with a ``task`` request of its own (UFO's
        device client does) and fails if it does not within ``command_timeout``;
        ``/api/task_result/{task_name}`` reports its end."""
        if not body.request:
            raise HTTPException(status_code=400, detail="Empty task content")
        if not body.client_id:
            raise HTTPException(status_code=400, detail="Empty client ID")
        if body.task_name is not None and sanitise_task_name(body.task_name) != body.task_name:
            raise HTTPException(
                status_code=400,
                detail="Unsafe task_name: use only letters, digits, '.', '_' and '-', "
                "not starting with '.'",
            )
        task_name = body.task_name or str(uuid.uuid4())
        if not registry.is_online(body.client_id):
            raise HTTPException(status_code=404, detail="Client not online")
        if not registry.is_device_connected(body.client_id):
            raise HTTPException(status_code=400, detail="Tasks are dispatched to devices only")
        limit: int = request.app.state.settings.max_sessions_per_client
        if sessions.active_count(body.client_id) >= limit:
            raise HTTPException(status_code=429, detail=f"Too many active sessions (limit {limit})")
        try:
            session_id = await sessions.dispatch(body.client_id, task_name, body.request)
        except InvalidArgumentError as exc:
            raise HTTPException(status_code=400, detail=f"Invalid task: {exc}") from None
        except (TimeoutError, StoreUnavailableError) as exc:
            logger.warning("dispatch of %s to %s refused: %r", task_name, body.client_id, exc)
            raise HTTPException(status_code=503, detail=STORE_BEHIND) from None
        if session_id is None:
            raise HTTPException(status_code=404, detail="Client not online")
        return {
            "status": "dispatched",
            "task_name": task_name,
            "client_id": body.client_id,
            "session_id": session_id,
        }

    @router.get("/task_result/{task_name}")
    async def task_result(task_name: Text, sessions: SessionsDep) -> dict[str, Any]:
        """``pending`` until a session of that task name has ended, then its result."""
        result = sessions.results.get(task_name)
        if result is None:
            return {"status": "pending"}
        return {"status": "done", "result": result}

    return router
