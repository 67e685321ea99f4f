"""The operator REST API under /api, on a database filled by a real server run."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.operator.conftest import (
    DEVICE_DISCONNECTED,
    GONE_INFO_1,
    GONE_INFO_2,
    LIN_INFO,
    WIN_INFO,
    Fleet,
    now,
)
from tests.support import WAIT, Clients, Server

pytestmark = pytest.mark.timeout(60)


def ts(value: str) -> datetime:
    """An ISO 8601 answer as an aware datetime (UTC offset required)."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def q(value: datetime) -> str:
    return value.isoformat()


async def get(http: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await http.get(path, params=params)
    assert response.status_code == 200, (path, params, response.text)
    return response.json()


async def walk(http: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged route, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = params.pop("cursor", None)
    for _ in range(1000):
        page = await get(http, path, **params, **({"cursor": cursor} if cursor else {}))
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("paging did not end")


def cursor_of(*key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


# -- /api/clients -------------------------------------------------------------------------------


async def test_clients_keeps_reference_shape_and_filters(fleet: Fleet) -> None:
    async with fleet.http() as http:
        body = await get(http, "/api/clients")
        assert list(body) == ["online_clients"]
        assert sorted(body["online_clients"]) == ["const-1", "dev-lin", "dev-win"]

        async def ids(**params: Any) -> list[str]:
            answer = await get(http, "/api/clients", **params)
            assert list(answer) == ["online_clients"], answer
            return sorted(answer["online_clients"])

        assert await ids(type="device") == ["dev-lin", "dev-win"]
        assert await ids(type="constellation") == ["const-1"]
        assert await ids(platform="windows") == ["dev-win"]
        assert await ids(platform="WINDOWS") == ["dev-win"]
        assert await ids(platform="Linux") == ["const-1", "dev-lin"]
        assert await ids(platform="linux", type="device") == ["dev-lin"]
        assert await ids(platform="linux", type="constellation") == ["const-1"]
        assert await ids(platform="macos") == []
        assert await ids(detail="false") == ["const-1", "dev-lin", "dev-win"]

        detail = await get(http, "/api/clients", detail="true")
        assert set(detail) == {"online_clients", "clients"}
        assert [c["client_id"] for c in detail["clients"]] == detail["online_clients"]
        by_id = {c["client_id"]: c for c in detail["clients"]}
        win = by_id["dev-win"]
        assert set(win) == {
            "client_id",
            "client_type",
            "platform",
            "metadata",
            "connected_at",
            "node_id",
        }
        assert win["client_type"] == "device"
        assert win["platform"] == "Windows"
        assert win["metadata"] == {"platform": "Windows", "system_info": WIN_INFO}
        assert win["node_id"] == fleet.registry.node_id
        assert fleet.marks["start"] < ts(win["connected_at"]) < fleet.marks["two_devices"]
        assert by_id["const-1"]["client_type"] == "constellation"
        assert fleet.marks["gone_offline"] < ts(by_id["const-1"]["connected_at"])

        narrowed = await get(http, "/api/clients", detail="true", type="constellation")
        assert narrowed["online_clients"] == ["const-1"]
        assert [c["client_id"] for c in narrowed["clients"]] == ["const-1"]

        refused = await http.get("/api/clients", params={"type": "robot"})
        assert refused.status_code == 422, refused.text


# -- /api/clients/{id} and its connections -------------------------------------------------------


async def test_client_summary_live_and_offline(fleet: Fleet) -> None:
    marks = fleet.marks
    async with fleet.http() as http:
        win = await get(http, "/api/clients/dev-win")
        assert win["online"] is True
        assert win["on_this_node"] is True
        assert win["connection_count"] == 1
        assert win["node_id"] == fleet.registry.node_id
        assert win["platform"] == "Windows"
        assert marks["start"] < ts(win["connected_at"]) < marks["two_devices"]
        assert ts(win["first_seen"]) <= ts(win["last_seen"])

        gone = await get(http, "/api/clients/dev-gone")
        assert gone["online"] is False
        assert gone["on_this_node"] is False
        assert gone["connected_at"] is None
        assert gone["node_id"] is None
        assert gone["connection_count"] == 2
        assert gone["client_type"] == "device"
        assert gone["metadata"] == {"platform": "linux", "system_info": GONE_INFO_2}
        assert marks["two_devices"] < ts(gone["first_seen"]) < marks["gone_online"]
        assert marks["all_online"] < ts(gone["last_seen"]) < marks["gone_failed"]

        missing = await http.get("/api/clients/never-seen")
        assert missing.status_code == 404
        assert "never-seen" in missing.json()["detail"]


async def test_connection_history(fleet: Fleet) -> None:
    marks = fleet.marks
    async with fleet.http() as http:
        page = await get(http, "/api/clients/dev-gone/connections")
        assert page["next_cursor"] is None
        newest, oldest = page["items"]
        assert (newest["close_code"], newest["close_reason"]) == (1001, "leaving")
        assert (oldest["close_code"], oldest["close_reason"]) == (1000, "bye")
        assert newest["metadata"]["system_info"] == GONE_INFO_2
        assert oldest["metadata"]["system_info"] == GONE_INFO_1
        assert marks["two_devices"] < ts(oldest["connected_at"]) < marks["gone_online"]
        assert marks["gone_online"] < ts(oldest["disconnected_at"]) < marks["gone_offline"]
        assert marks["const_online"] < ts(newest["connected_at"]) < marks["all_online"]
        assert marks["after_b"] < ts(newest["disconnected_at"]) < marks["gone_failed"]
        for item in (newest, oldest):
            assert item["node_id"] == fleet.registry.node_id
            assert item["remote_address"].startswith("127.0.0.1:")
            span = ts(item["disconnected_at"]) - ts(item["connected_at"])
            assert item["duration_seconds"] == pytest.approx(span.total_seconds(), abs=1e-5)
            assert item["duration_seconds"] > 0

        (live,) = (await get(http, "/api/clients/dev-win/connections"))["items"]
        assert live["disconnected_at"] is None
        assert live["duration_seconds"] is None
        assert (live["close_code"], live["close_reason"]) == (None, None)

        first = await get(http, "/api/clients/dev-gone/connections", limit=1)
        assert [c["connection_id"] for c in first["items"]] == [newest["connection_id"]]
        assert first["next_cursor"]
        second = await get(
            http, "/api/clients/dev-gone/connections", limit=1, cursor=first["next_cursor"]
        )
        assert [c["connection_id"] for c in second["items"]] == [oldest["connection_id"]]
        assert second["next_cursor"] is None

        since = await get(http, "/api/clients/dev-gone/connections", since=q(marks["gone_offline"]))
        assert [c["connection_id"] for c in since["items"]] == [newest["connection_id"]]
        until = await get(http, "/api/clients/dev-gone/connections", until=q(marks["gone_offline"]))
        assert [c["connection_id"] for c in until["items"]] == [oldest["connection_id"]]
        naive = marks["gone_offline"].replace(tzinfo=None).isoformat()  # naive means UTC
        assert (await get(http, "/api/clients/dev-gone/connections", since=naive))["items"] == [
            newest
        ]

        assert (await get(http, "/api/clients/never-seen/connections"))["items"] == []


# -- sessions -----------------------------------------------------------------------------------


async def test_session_filters(fleet: Fleet) -> None:
    marks = fleet.marks
    async with fleet.http() as http:

        async def ids(**params: Any) -> list[str]:
            return [s["session_id"] for s in await walk(http, "/api/sessions", **params)]

        every = await walk(http, "/api/sessions")
        assert [s["session_id"] for s in every] == ["task-d@1", "task-c@1", "task-b@1", "task-a@1"]
        by_id = {s["session_id"]: s for s in every}
        assert by_id["task-a@1"] | {"created_at": None, "ended_at": None} == {
            "session_id": "task-a@1",
            "owner_id": "const-1",
            "executor_id": "dev-win",
            "task_name": "task-a",
            "state": "completed",
            "node_id": fleet.registry.node_id,
            "created_at": None,
            "ended_at": None,
            "end_reason": None,
        }
        assert by_id["task-c@1"]["state"] == "failed"
        assert by_id["task-c@1"]["end_reason"] == DEVICE_DISCONNECTED
        assert by_id["task-d@1"]["state"] == "active"
        assert by_id["task-d@1"]["ended_at"] is None
        assert marks["after_a"] < ts(by_id["task-b@1"]["created_at"]) < marks["after_b"]

        assert await ids(client="dev-lin") == ["task-d@1", "task-b@1"]
        assert await ids(client="dev-lin", role="owner") == ["task-b@1"]
        assert await ids(client="dev-lin", role="executor") == ["task-d@1", "task-b@1"]
        assert await ids(client="const-1", role="owner") == ["task-d@1", "task-c@1", "task-a@1"]
        assert await ids(client="const-1", role="executor") == []
        assert await ids(client="dev-gone") == ["task-c@1"]
        assert await ids(state="failed") == ["task-c@1"]
        assert await ids(state="active") == ["task-d@1"]
        assert await ids(state="completed") == ["task-b@1", "task-a@1"]
        assert await ids(state="interrupted") == []
        assert await ids(state="completed", client="dev-win") == ["task-a@1"]
        assert await ids(since=q(marks["after_b"])) == ["task-d@1", "task-c@1"]
        assert await ids(until=q(marks["after_b"])) == ["task-b@1", "task-a@1"]
        assert await ids(since=q(marks["after_a"]), until=q(marks["gone_failed"])) == [
            "task-c@1",
            "task-b@1",
        ]
        assert await ids(limit=1) == ["task-d@1", "task-c@1", "task-b@1", "task-a@1"]
        assert await ids(client="never-seen") == []


async def test_session_detail_links_and_events(fleet: Fleet) -> None:
    async with fleet.http() as http:
        failed = await get(http, "/api/sessions/task-c@1")
        assert failed["session"]["state"] == "failed"
        assert failed["session"]["executor_id"] == "dev-gone"
        links = {(link["client_id"], link["role"]): link for link in failed["links"]}
        assert set(links) == {("const-1", "constellation"), ("dev-gone", "device")}
        ended = ts(failed["session"]["ended_at"])
        for link in links.values():
            assert ts(link["bound_at"]) <= ended
            assert ts(link["unbound_at"]) == ended  # unbound when the session ended
        kinds = [event["kind"] for event in failed["events"]]
        assert kinds[0] == "session_opened"
        assert kinds[-1] == "session_ended"
        assert sorted(kinds[1:-1]) == ["session_bound"] * 2 + ["session_unbound"] * 2
        assert all(event["session_id"] == "task-c@1" for event in failed["events"])
        ids = [event["event_id"] for event in failed["events"]]
        assert ids == sorted(ids)
        assert failed["events"][-1]["details"] == {"state": "failed", "reason": DEVICE_DISCONNECTED}

        running = await get(http, "/api/sessions/task-d@1")
        assert running["session"]["state"] == "active"
        assert {(link["client_id"], link["role"]) for link in running["links"]} == {
            ("const-1", "constellation"),
            ("dev-lin", "device"),
        }
        assert all(link["unbound_at"] is None for link in running["links"])  # still bound
        assert [event["kind"] for event in running["events"]] == [
            "session_opened",
            "session_bound",
            "session_bound",
        ]

        own = await get(http, "/api/sessions/task-b@1")
        assert [(link["client_id"], link["role"]) for link in own["links"]] == [
            ("dev-lin", "device")
        ]

        missing = await http.get("/api/sessions/no-such-session")
        assert missing.status_code == 404
        assert "no-such-session" in missing.json()["detail"]


# -- device info --------------------------------------------------------------------------------


async def test_device_info_latest_and_history(fleet: Fleet) -> None:
    async with fleet.http() as http:
        gone = await get(http, "/api/devices/dev-gone/info")  # offline now
        assert gone["device_id"] == "dev-gone"
        assert gone["info"] == GONE_INFO_2
        assert fleet.marks["const_online"] < ts(gone["captured_at"]) < fleet.marks["all_online"]
        assert (await get(http, "/api/devices/dev-win/info"))["info"] == WIN_INFO
        assert (await get(http, "/api/devices/dev-lin/info"))["info"] == LIN_INFO

        history = await walk(http, "/api/devices/dev-gone/info/history", limit=1)
        assert [item["info"] for item in history] == [GONE_INFO_2, GONE_INFO_1]
        assert ts(history[0]["captured_at"]) > ts(history[1]["captured_at"])
        assert history[0] == gone
        recent = await get(
            http, "/api/devices/dev-gone/info/history", since=q(fleet.marks["gone_offline"])
        )
        assert [item["info"] for item in recent["items"]] == [GONE_INFO_2]
        win = await get(http, "/api/devices/dev-win/info/history")
        assert [item["info"] for item in win["items"]] == [WIN_INFO]  # one row: unchanged

        for device in ("const-1", "never-seen"):
            missing = await http.get(f"/api/devices/{device}/info")
            assert missing.status_code == 404, missing.text
            assert device in missing.json()["detail"]
        assert (await get(http, "/api/devices/never-seen/info/history"))["items"] == []


# -- statistics ---------------------------------------------------------------------------------


async def test_statistics(fleet: Fleet) -> None:
    marks = fleet.marks
    async with fleet.http() as http:
        gone = (await get(http, "/api/clients/dev-gone/connections"))["items"]
        durations = [item["duration_seconds"] for item in gone]

        default = await get(http, "/api/stats")
        assert ts(default["until"]) - ts(default["since"]) == timedelta(days=1)
        explicit = await get(http, "/api/stats", since=q(marks["start"]), until=q(now()))
        for stats in (default, explicit):
            assert stats["online_by_type"] == {"device": 2, "constellation": 1}
            assert stats["online_by_platform"] == {"windows": 1, "linux": 2}
            assert stats["connections"] == 5
            assert stats["distinct_clients"] == 4
            assert stats["disconnects_by_reason"] == {"bye": 1, "leaving": 1}
            assert stats["sessions_by_state"] == {"active": 1, "completed": 2, "failed": 1}
            # From the duration sketch: within 2% of the exact percentile.
            assert stats["p95_duration_seconds"] == pytest.approx(max(durations), rel=0.02)
            assert stats["mean_duration_seconds"] == pytest.approx(sum(durations) / 2, abs=1e-3)
            assert stats["availability"] is None  # paged at /api/stats/availability
        for window in ({}, {"since": q(marks["start"]), "until": q(now())}):
            devices = {
                item["device_id"]: item["availability"]
                for item in await walk(http, "/api/stats/availability", limit=1, **window)
            }
            assert set(devices) == {"dev-gone", "dev-lin", "dev-win"}
            assert all(0 < value <= 1 for value in devices.values())

        # Over [two_devices, end): the Windows and Linux devices were connected all along,
        # dev-gone only part of the time.
        bounds = {"since": q(marks["two_devices"]), "until": q(marks["end"])}
        window = await get(http, "/api/stats", **bounds)
        availability = {
            item["device_id"]: item["availability"]
            for item in (await get(http, "/api/stats/availability", **bounds))["items"]
        }
        assert availability["dev-win"] == pytest.approx(1.0, abs=1e-3)
        assert availability["dev-lin"] == pytest.approx(1.0, abs=1e-3)
        length = (marks["end"] - marks["two_devices"]).total_seconds()
        connected = sum(
            (ts(c["disconnected_at"]) - ts(c["connected_at"])).total_seconds() for c in gone
        )  # both of dev-gone's connections lie inside the window
        assert 0.0 < availability["dev-gone"] < 1.0
        assert availability["dev-gone"] == pytest.approx(connected / length, abs=0.01)
        assert window["connections"] == 3  # dev-gone twice, const-1
        assert window["distinct_clients"] == 2
        # Still online: counted "now", whatever the window.
        assert window["online_by_type"] == {"device": 2, "constellation": 1}

        # A window in which nothing happened.
        before = await get(
            http,
            "/api/stats",
            since=q(marks["start"] - timedelta(hours=1)),
            until=q(marks["start"]),
        )
        assert before["connections"] == 0
        assert before["mean_duration_seconds"] is None
        assert before["p95_duration_seconds"] is None
        assert before["disconnects_by_reason"] == {}
        assert before["sessions_by_state"] == {}
        before_window = {
            "since": q(marks["start"] - timedelta(hours=1)),
            "until": q(marks["start"]),
        }
        assert (await get(http, "/api/stats/availability", **before_window))["items"] == []

        inverted = await http.get(
            "/api/stats", params={"since": q(marks["end"]), "until": q(marks["start"])}
        )
        assert inverted.status_code == 422
        assert "since" in inverted.json()["detail"]


# -- audit --------------------------------------------------------------------------------------


async def test_audit_filters_and_order(fleet: Fleet) -> None:
    marks = fleet.marks
    async with fleet.http() as http:
        ascending = await walk(http, "/api/audit", limit=1000)
        ids = [event["event_id"] for event in ascending]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert ascending[0]["kind"] == "node_started"
        descending = await walk(http, "/api/audit", order="desc", limit=1000)
        assert descending == ascending[::-1]
        assert await walk(http, "/api/audit", limit=3) == ascending
        assert await walk(http, "/api/audit", limit=4, order="desc") == descending

        registered = await walk(http, "/api/audit", kind="client_registered")
        assert [e["client_id"] for e in registered] == [
            "dev-win",
            "dev-lin",
            "dev-gone",
            "const-1",
            "dev-gone",
        ]
        assert all(e["node_id"] == fleet.registry.node_id for e in registered)
        assert registered[0]["details"]["platform"] == "Windows"

        gone = await walk(http, "/api/audit", client="dev-gone")
        assert all(e["client_id"] == "dev-gone" for e in gone)
        kinds = [e["kind"] for e in gone]
        assert kinds.count("client_registered") == 2
        assert kinds.count("device_info_changed") == 2
        assert [e["details"]["reason"] for e in gone if e["kind"] == "client_removed"] == [
            "bye",
            "leaving",
        ]

        removed = await walk(http, "/api/audit", kind="client_removed", client="dev-gone")
        assert [e["details"]["code"] for e in removed] == [1000, 1001]

        session = await walk(http, "/api/audit", session="task-a@1")
        assert {e["session_id"] for e in session} == {"task-a@1"}
        assert session[-1]["kind"] == "session_ended"

        window = await walk(
            http, "/api/audit", since=q(marks["gone_offline"]), until=q(marks["const_online"])
        )
        assert [(e["kind"], e["client_id"]) for e in window] == [("client_registered", "const-1")]
        assert await walk(http, "/api/audit", kind="no_such_kind") == []


async def connect_and_leave(fleet: Fleet, clients: Clients, client_id: str) -> None:
    """One whole connection of ``client_id``, its disconnect durable on return."""
    await (await clients.register(client_id)).close()
    deadline = time.monotonic() + WAIT
    while fleet.registry.is_online(client_id):
        assert time.monotonic() < deadline, f"{client_id} still online"
        await asyncio.sleep(0.005)
    await fleet.registry.flush()


async def test_paging_is_stable_under_concurrent_inserts(fleet: Fleet) -> None:
    clients = Clients(fleet.server)
    try:
        async with fleet.http() as http:
            # The connection history of a client that keeps reconnecting.
            for _ in range(4):
                await connect_and_leave(fleet, clients, "dev-flap")
            path = "/api/clients/dev-flap/connections"
            first = await get(http, path, limit=2)
            audit_up = await get(http, "/api/audit", limit=5)
            audit_down = await get(http, "/api/audit", limit=5, order="desc")
            assert first["next_cursor"]
            assert audit_up["next_cursor"]
            assert audit_down["next_cursor"]

            for _ in range(3):  # new rows at the front of the connection history
                await connect_and_leave(fleet, clients, "dev-flap")
            await connect_and_leave(fleet, clients, "dev-other")

            rest = await walk(http, path, limit=2, cursor=first["next_cursor"])
            full = await walk(http, path, limit=1000)
            assert len(full) == 7
            paged = [c["connection_id"] for c in first["items"] + rest]
            assert len(paged) == len(set(paged)) == 4  # no duplicates
            new = {c["connection_id"] for c in full[:3]}
            assert paged == [c["connection_id"] for c in full if c["connection_id"] not in new]

            up = audit_up["items"] + await walk(
                http, "/api/audit", limit=5, cursor=audit_up["next_cursor"]
            )
            down = audit_down["items"] + await walk(
                http, "/api/audit", limit=5, order="desc", cursor=audit_down["next_cursor"]
            )
            everything = await walk(http, "/api/audit", limit=1000)
            newest_then = audit_down["items"][0]["event_id"]
            assert [e["event_id"] for e in up] == [e["event_id"] for e in everything]
            assert [e["event_id"] for e in down] == [
                e["event_id"] for e in reversed(everything) if e["event_id"] <= newest_then
            ]
            assert any(e["event_id"] > newest_then for e in everything)  # events did come in
    finally:
        await clients.aclose()


# -- bad parameters and keys --------------------------------------------------------------------


def _detail_mentions(body: dict[str, Any], name: str) -> bool:
    detail = body.get("detail")
    if isinstance(detail, str):
        return name in detail
    assert isinstance(detail, list), body
    assert detail, body
    return any(
        name in [str(part) for part in problem["loc"]] and problem["msg"] for problem in detail
    )


BAD_REQUESTS = [
    ("/api/audit", {"limit": "0"}, "limit"),
    ("/api/audit", {"limit": "-5"}, "limit"),
    ("/api/audit", {"limit": "1001"}, "limit"),
    ("/api/audit", {"limit": "ten"}, "limit"),
    ("/api/audit", {"since": "yesterday"}, "since"),
    ("/api/audit", {"until": "2026-13-45T00:00:00"}, "until"),
    ("/api/audit", {"order": "sideways"}, "order"),
    ("/api/audit", {"cursor": "not a cursor!"}, "cursor"),
    ("/api/audit", {"cursor": cursor_of("2026-01-01T00:00:00+00:00", "x")}, "cursor"),
    ("/api/audit", {"cursor": cursor_of("seven")}, "cursor"),
    ("/api/audit", {"cursor": cursor_of(10**30)}, "cursor"),
    ("/api/audit", {"cursor": base64.urlsafe_b64encode(b"[1e999]").decode()}, "cursor"),
    ("/api/audit", {"cursor": base64.urlsafe_b64encode(b"{}").decode()}, "cursor"),
    ("/api/sessions", {"state": "paused"}, "state"),
    ("/api/sessions", {"role": "boss", "client": "x"}, "role"),
    ("/api/sessions", {"role": "owner"}, "role"),
    ("/api/sessions", {"limit": "0"}, "limit"),
    ("/api/sessions", {"since": "noon"}, "since"),
    ("/api/sessions", {"cursor": cursor_of("2026-01-01T00:00:00", "x")}, "cursor"),  # naive
    ("/api/sessions", {"cursor": cursor_of(5)}, "cursor"),
    ("/api/clients/x/connections", {"limit": "1001"}, "limit"),
    ("/api/clients/x/connections", {"since": "2026-02-30"}, "since"),
    ("/api/clients/x/connections", {"cursor": cursor_of("not a time", "x")}, "cursor"),
    ("/api/devices/x/info/history", {"limit": "-1"}, "limit"),
    ("/api/devices/x/info/history", {"cursor": cursor_of("abc")}, "cursor"),
    ("/api/devices/x/info/history", {"cursor": cursor_of(-(10**25))}, "cursor"),
    ("/api/stats", {"since": "last week"}, "since"),
    ("/api/stats", {"until": "soon"}, "until"),
    ("/api/clients", {"type": "robot"}, "type"),
    ("/api/clients", {"detail": "perhaps"}, "detail"),
]


async def test_bad_parameters_are_422_with_a_message(server: Server) -> None:
    async with server.http() as http:
        failures = []
        for path, params, name in BAD_REQUESTS:
            response = await http.get(path, params=params)
            if response.status_code != 422 or not _detail_mentions(response.json(), name):
                failures.append((path, params, response.status_code, response.text[:200]))
        assert failures == []
        # Bad parameters changed nothing: the server still answers.
        assert (await http.get("/api/audit")).status_code == 200


ROUTES = [
    "/api/clients",
    "/api/clients/dev-x",
    "/api/clients/dev-x/connections",
    "/api/sessions",
    "/api/sessions/s-1",
    "/api/devices/dev-x/info",
    "/api/devices/dev-x/info/history",
    "/api/stats",
    "/api/audit",
    "/metrics",
]


async def test_api_key_required(server: Server) -> None:
    async with server.http(api_key=None) as anonymous, server.http(api_key="wrong") as wrong:
        for route in ROUTES:
            missing = await anonymous.get(route)
            assert missing.status_code == 401, (route, missing.text)
            refused = await wrong.get(route)
            assert refused.status_code == 401, (route, refused.text)
            assert refused.json() == {"detail": "Invalid API key"}
    async with server.http() as http:
        assert (await http.get("/api/stats")).status_code == 200
