"""The HTTP API fuzzed from its own OpenAPI schema with Schemathesis: no 500s, and every answer
conforms to the schema (status code documented, body valid, content type right).

The app is reached in process over ASGI (``schemathesis.openapi.from_asgi``), which runs its
lifespan (the routes need ``app.state.registry``) on an event loop of Schemathesis' own. Its
database is a copy of one a registry filled first, so that the history routes have clients,
connections, sessions, device info and audit events to answer with.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from registry import ClientType, Registry, SessionState
from registry.server import create_app
from registry.settings import Settings
from tests.support import API_KEY

pytestmark = pytest.mark.timeout(120)

HEADERS = {"X-API-Key": API_KEY}
#: No 500s, and answers as the schema documents them: status code, content type, headers
#: and body. Not ``positive_data_acceptance``: a schema-valid request may still be refused,
#: say a cursor this API never issued, or an empty dispatch, which docs/protocol.md wants a 400.
#: Not ``negative_data_rejection``: unknown query parameters are ignored, not refused.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
DEVICE_INFO = {"os": "linux", "cpu": {"cores": 8}, "tags": ["gpu", "ci"]}


async def _fill(database_url: str) -> None:
    """Clients, connections, sessions (ended and left active), device info and audit events."""
    async with Registry(database_url, node_name="seed:1") as registry:
        registry.add_client("dev-1", "linux", object(), ClientType.DEVICE, {"gpu": True})
        registry.set_device_info("dev-1", DEVICE_INFO)
        registry.add_client("const-1", "windows", object(), ClientType.CONSTELLATION, {})
        await registry.open_session("s-1", owner_id="const-1", executor_id="dev-1", task_name="a")
        await registry.end_session("s-1", SessionState.COMPLETED, "done")
        await registry.open_session("s-2", owner_id="dev-1", executor_id="dev-1", task_name="b")
        registry.set_device_info("dev-1", DEVICE_INFO | {"os": "linux-6"})
        registry.remove_client("const-1", code=1000, reason="client_closed")
        await registry.flush()
    # closing it leaves dev-1's connection closed (server_shutdown) and s-2 interrupted


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http-fuzz") / "template.db"
    asyncio.run(_fill(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture
def api_schema(template: Path, tmp_path: Path) -> OpenApiSchema:
    database = tmp_path / "api.db"
    shutil.copyfile(template, database)
    settings_ = Settings(
        database_url=f"sqlite+aiosqlite:///{database}",
        api_key=API_KEY,
        allowed_hosts=["testserver"],  # the Host of Schemathesis' ASGI client
        heartbeat_interval=0.5,
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))


#: Streams that never end (Server-Sent Events): a call would not return. ``/api/events`` is
#: tested over real HTTP in tests/server/test_events.py.
ENDLESS = {("GET", "/api/events")}


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the app's schema (no lifespan needed for that)."""
    app = create_app(Settings(api_key=API_KEY, database_url="sqlite+aiosqlite:///unused.db"))
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    operations = [(method.upper(), path) for path, methods in paths.items() for method in methods]
    return [operation for operation in operations if operation not in ENDLESS]


# Each operation is a test of its own, driven by Hypothesis through ``as_strategy``, rather
# than through ``schemathesis.pytest.from_fixture``: that one fails on pytest 9
# (``'Function' object has no attribute '_nodeid'``).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), _operations())
def test_api_conforms_to_its_schema(
    api_schema: OpenApiSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(mode))
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=HEADERS, checks=CHECKS)

    check()


KNOWN: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # (path, method, path parameters, query): answers with content, validated too
    ("/api/clients", "GET", {}, {"detail": True}),
    ("/api/clients", "GET", {}, {"type": "device", "platform": "LINUX"}),
    ("/api/clients/{client_id}", "GET", {"client_id": "dev-1"}, {}),
    ("/api/clients/{client_id}", "GET", {"client_id": "const-1"}, {}),
    ("/api/clients/{client_id}/connections", "GET", {"client_id": "dev-1"}, {"limit": 1}),
    ("/api/sessions", "GET", {}, {"client": "dev-1", "role": "executor"}),
    ("/api/sessions", "GET", {}, {"state": "interrupted"}),
    ("/api/sessions/{session_id}", "GET", {"session_id": "s-1"}, {}),
    ("/api/sessions/{session_id}", "GET", {"session_id": "s-2"}, {}),
    ("/api/devices/{device_id}/info", "GET", {"device_id": "dev-1"}, {}),
    ("/api/devices/{device_id}/info/history", "GET", {"device_id": "dev-1"}, {"limit": 1}),
    ("/api/stats", "GET", {}, {"since": "2000-01-01T00:00:00"}),
    ("/api/audit", "GET", {}, {"order": "desc", "limit": 3}),
    ("/api/audit", "GET", {}, {"session": "s-1"}),
    ("/api/health", "GET", {}, {}),
    ("/api/task_result/{task_name}", "GET", {"task_name": "nothing"}, {}),
    ("/api/store", "GET", {}, {}),
    ("/api/nodes", "GET", {}, {}),
    ("/api/disconnects", "GET", {}, {"abnormal": False, "limit": 1}),
    ("/api/online", "GET", {}, {"q": "DEV", "type": "device"}),
]


@pytest.mark.parametrize(("path", "method", "parameters", "query"), KNOWN)
def test_answers_with_content_conform_to_the_schema(
    api_schema: OpenApiSchema,
    path: str,
    method: str,
    parameters: dict[str, Any],
    query: dict[str, Any],
) -> None:
    """Random ids rarely name anything: these name what the database holds."""
    case = api_schema[path][method].Case(path_parameters=parameters, query=query)
    response = case.call_and_validate(headers=HEADERS, checks=CHECKS)
    assert response.status_code == 200, response.text


#: Instants UTC cannot hold as a datetime: converting them for the store used to fail (500).
EARLIEST = "0001-01-01T00:00:00+01:00"
LATEST = "9999-12-31T23:59:59-01:00"
WINDOWED = [
    ("/api/clients/{client_id}/connections", {"client_id": "dev-1"}),
    ("/api/sessions", {}),
    ("/api/devices/{device_id}/info/history", {"device_id": "dev-1"}),
    ("/api/audit", {}),
    ("/api/stats", {}),
    ("/api/disconnects", {}),
]


@pytest.mark.parametrize(
    "window",
    [
        {"since": EARLIEST},
        {"until": LATEST},
        {"since": EARLIEST, "until": LATEST},
        {"until": EARLIEST},
        {"since": LATEST},
        {"until": "0001-01-01T00:00:00Z"},  # the statistics' default window starts a day earlier
    ],
    ids=["since-earliest", "until-latest", "all-time", "until-earliest", "since-latest", "year-1"],
)
@pytest.mark.parametrize(("path", "parameters"), WINDOWED, ids=[path for path, _ in WINDOWED])
def test_windows_at_the_edges_of_time(
    api_schema: OpenApiSchema, path: str, parameters: dict[str, Any], window: dict[str, str]
) -> None:
    case = api_schema[path]["GET"].Case(path_parameters=parameters, query=window)
    response = case.call_and_validate(headers=HEADERS, checks=CHECKS)
    if path == "/api/stats" and window == {"since": LATEST}:  # until is now: before since
        assert response.status_code == 422, response.text
        return
    assert response.status_code == 200, response.text
    body = response.json()
    if path != "/api/stats":
        # Clamped to the first or last instant, a bound still selects the same rows.
        everything = (
            window.get("since", EARLIEST) == EARLIEST and window.get("until", LATEST) == LATEST
        )
        assert bool(body["items"]) == everything, body


def test_a_cursor_at_the_edge_of_time_is_refused(api_schema: OpenApiSchema) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps([EARLIEST, "s-1"]).encode()).decode()
    case = api_schema["/api/sessions"]["GET"].Case(query={"cursor": cursor})
    response = case.call_and_validate(headers=HEADERS, checks=CHECKS)
    assert response.status_code == 422, response.text
