"""Input no backend can store (a NUL, a lone surrogate) and cursors the server never issued are
bad requests: a 422 naming the parameter from every REST route, exit code 2 naming it from the
CLI, on SQLite and PostgreSQL alike. They never reach the store, so PostgreSQL cannot turn them
into a 503 (an outage, to monitoring) and SQLite cannot turn them into a 500."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from typing import Any
from urllib.parse import quote

import pytest

from registry import Registry
from tests.operator.conftest import cli
from tests.support import Server

pytestmark = pytest.mark.timeout(120)

NUL = "a\x00b"
#: What an argument with a byte that is not UTF-8 becomes in ``sys.argv``: a lone surrogate.
UNDECODABLE = os.fsdecode(b"a\xffb")


def crafted(*key: Any) -> str:
    """A cursor of this shape, as the server would encode it (but never issued)."""
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


#: Cursors of every shape the routes use, holding values no backend can take.
CURSORS = [
    crafted("2026-01-01T00:00:00+00:00", "\ud800"),
    crafted("2026-01-01T00:00:00+00:00", "a\x00b"),
    crafted("2026-01-01T00:00:00\ud800+00:00", "x"),
    base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00", "\xed\xa0\x80"]').decode(),
    crafted("\ud800"),
    crafted(NUL),
]


def _routes(server: Server) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every GET route of the API with its parameters, from the app's own OpenAPI schema."""
    return [
        (path, operation.get("parameters", []))
        for path, operations in server.app.openapi()["paths"].items()
        for method, operation in operations.items()
        if method == "get" and path.startswith("/api")
    ]


def _request(
    path: str, parameters: list[dict[str, Any]], name: str, value: str
) -> tuple[str, dict[str, str]]:
    """``path`` with ``value`` as its parameter ``name`` (other path parameters plain)."""
    query: dict[str, str] = {}
    for parameter in parameters:
        if parameter["in"] == "path":
            segment = quote(value, safe="") if parameter["name"] == name else "x"
            path = path.replace("{" + parameter["name"] + "}", segment)
        elif parameter["name"] == name:
            query[name] = value
    return path, query


def _names(detail: Any) -> str:
    return json.dumps(detail)


async def test_every_route_refuses_unstorable_parameters(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    failures = []
    probes = 0
    async with server.http() as http:
        for path, parameters in _routes(server):
            for parameter in parameters:
                if parameter["in"] not in ("path", "query"):
                    continue  # a header cannot carry a NUL
                name = parameter["name"]
                values = [NUL] + (CURSORS if name == "cursor" else [])
                for value in values:
                    url, query = _request(path, parameters, name, value)
                    response = await http.get(url, params=query)
                    probes += 1
                    if response.status_code != 422 or name not in _names(response.json()):
                        failures.append((path, name, value, response.status_code, response.text))
        # The body of the one POST route: nothing it holds reaches a 5xx either.
        for field in ("client_id", "request", "task_name"):
            for value in (NUL, "\ud800"):
                body = {"client_id": "dev-1", "request": "do it", field: value}
                response = await http.post(
                    "/api/dispatch",
                    content=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
                if response.status_code >= 500:
                    failures.append(
                        ("/api/dispatch", field, value, response.status_code, response.text)
                    )
        assert (await http.get("/api/audit")).status_code == 200
    assert failures == []
    assert probes > 20  # every route was driven
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert problems == [], [r.getMessage() for r in problems]


async def test_cli_refuses_unstorable_arguments(registry: Registry) -> None:
    url = ("--database-url", registry.database_url)
    commands = [
        (("client", UNDECODABLE), "CLIENT_ID"),
        (("history", UNDECODABLE), "CLIENT_ID"),
        (("sessions", "--client", UNDECODABLE), "--client"),
        (("audit", "--kind", UNDECODABLE), "--kind"),
        (("audit", "--client", UNDECODABLE), "--client"),
        (("audit", "--session", UNDECODABLE), "--session"),
        (("clients", "--platform", UNDECODABLE), "--platform"),
        # Each command with a cursor of its own shape holding a lone surrogate and a NUL.
        *[
            ((*command, "--cursor", cursor), "--cursor")
            for command in (("clients",), ("sessions",), ("history", "dev-1"))
            for cursor in CURSORS[:2]
        ],
        *[(("audit", "--cursor", cursor), "--cursor") for cursor in CURSORS[-2:]],
    ]
    running = asyncio.Semaphore(4)

    async def refused(args: tuple[str, ...], name: str) -> Any:
        async with running:
            outcome = await cli(*args, *url)
        if outcome.code != 2 or name not in outcome.stderr or "Traceback" in outcome.stderr:
            return args, outcome
        return None

    failures = await asyncio.gather(*(refused(args, name) for args, name in commands))
    assert [failure for failure in failures if failure is not None] == []
