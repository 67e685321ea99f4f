"""docs/protocol.md, "After registration": every message flow, frame by frame, exact texts."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.support import Client, Clients, Server, assert_error, assert_server_frame, sql

SECRET_INFO = {"os": "victim-os", "secret": "s3cr3t-token-value"}


@pytest.fixture
def db_url(database_url: str) -> str:
    """On SQLite and on PostgreSQL: these flows touch the store."""
    return database_url


def _task(client: Client, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "task", "status": "continue", "request": "do something"}
    frame.update(fields)
    return frame


def _const_task(const: Client, target: str | None, **fields: Any) -> dict[str, Any]:
    frame = _task(const, client_type="constellation", client_id=const.client_id, **fields)
    if target is not None:
        frame["target_id"] = target
    return frame


async def _accepted(requester: Client, session_id: str) -> None:
    ack = await requester.recv()
    assert_server_frame(ack)
    assert ack["type"] == "heartbeat"
    assert ack["status"] == "ok"
    assert ack["session_id"] == session_id
    assert ack["error"] is None


async def _sessions_in_store(server: Server) -> list[str]:
    await server.registry.flush()
    return [row[0] for row in await sql(server.database_url, "SELECT session_id FROM sessions")]


# -- identity pinning --------------------------------------------------------------------------


async def test_client_id_mismatch_is_refused(server: Server, clients: Clients) -> None:
    victim = await clients.device("victim")
    device = await clients.device("dev-1")
    await device.send(type="heartbeat", status="ok", client_id="victim")
    assert_error(await device.recv(), "client_id does not match the registered connection")
    await device.send(**_task(device, client_id="victim", session_id="spoof"))
    assert_error(await device.recv(), "client_id does not match the registered connection")
    await victim.nothing()
    assert await _sessions_in_store(server) == []
    # The connection stays usable; a frame naming its own id (or none) is fine.
    assert (await device.heartbeat(client_id="dev-1"))["type"] == "heartbeat"
    assert (await device.heartbeat())["type"] == "heartbeat"


async def test_device_claiming_constellation_is_refused(server: Server, clients: Clients) -> None:
    await clients.device("other", SECRET_INFO)
    device = await clients.device("dev-2")
    await device.send(
        **_task(device, client_type="constellation", target_id="other", session_id="x@1")
    )
    assert_error(await device.recv(), "client_type does not match the registered connection")
    await device.send(
        type="device_info_request",
        status="ok",
        client_type="constellation",
        target_id="other",
        request_id="r1",
    )
    assert_error(await device.recv(), "client_type does not match the registered connection")
    assert "s3cr3t" not in "".join(str(raw) for raw in device.raw)
    assert await _sessions_in_store(server) == []


async def test_constellation_task_with_device_client_type_is_refused(
    server: Server, clients: Clients
) -> None:
    target = await clients.device("dev-3")
    const = await clients.constellation("const-3")
    await const.send(**_task(const, client_type="device", target_id="dev-3", session_id="y@1"))
    assert_error(await const.recv(), "client_type does not match the registered connection")
    await target.nothing()
    assert await _sessions_in_store(server) == []


async def test_heartbeats_are_exempt_from_the_role_check(server: Server, clients: Clients) -> None:
    const = await clients.constellation("const-hb")
    # The constellation client sends its heartbeats with the default client_type "device".
    await const.send(type="heartbeat", status="ok", client_id="const-hb")
    ack = await const.recv()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    await const.send(type="heartbeat", status="ok", client_type="device")
    assert (await const.recv())["type"] == "heartbeat"
    device = await clients.device("dev-hb")
    await device.send(type="heartbeat", status="ok", client_type="constellation")
    assert (await device.recv())["type"] == "heartbeat"


async def test_heartbeat_ack_has_a_fresh_response_id(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-beat")
    first = await device.heartbeat()
    second = await device.heartbeat(client_id="dev-beat", session_id="ignored")
    for ack in (first, second):
        assert_server_frame(ack)
        assert (ack["type"], ack["status"], ack["error"]) == ("heartbeat", "ok", None)
        uuid.UUID(ack["response_id"])
    assert first["response_id"] != second["response_id"]


# -- device info -------------------------------------------------------------------------------


async def test_device_info_request_from_a_device_is_refused_without_leaking(
    server: Server, clients: Clients
) -> None:
    victim = await clients.device("victim-dev", SECRET_INFO)
    attacker = await clients.device("attacker-dev")
    for fields in ({}, {"client_type": "device"}):
        await attacker.send(
            type="device_info_request",
            status="ok",
            target_id="victim-dev",
            request_id="r-1",
            **fields,
        )
        assert_error(
            await attacker.recv(),
            "DEVICE_INFO_REQUEST is permitted only for constellation clients",
        )
    await attacker.heartbeat()
    await attacker.nothing()
    await victim.nothing()
    received = "".join(str(raw) for raw in attacker.raw)
    assert "s3cr3t" not in received
    assert "victim-os" not in received


async def test_scoped_constellation_cannot_ask_about_another_device(
    server: Server, clients: Clients
) -> None:
    await clients.device("victim-2", SECRET_INFO)
    await clients.device("mine", {"os": "mine-os"})
    const = await clients.constellation("const-scoped", target_id="mine")
    await const.send(
        type="device_info_request",
        status="ok",
        client_type="constellation",
        target_id="victim-2",
        request_id="r-2",
    )
    assert_error(await const.recv(), "Not authorized to request device info for this device")
    # A request naming no device is out of scope too.
    await const.send(
        type="device_info_request", status="ok", client_type="constellation", request_id="r-3"
    )
    assert_error(await const.recv(), "Not authorized to request device info for this device")
    await const.heartbeat()
    await const.nothing()
    received = "".join(str(raw) for raw in const.raw)
    assert "s3cr3t" not in received
    assert "victim-os" not in received


async def test_device_info_response_carries_the_info_to_the_requester_only(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-i", {"os": "linux", "cores": 4})
    const = await clients.constellation("const-i", target_id="dev-i")
    await const.send(
        type="device_info_request",
        status="ok",
        client_type="constellation",
        target_id="dev-i",
        request_id="req-42",
    )
    answer = await const.recv()
    assert_server_frame(answer)
    assert answer["type"] == "device_info_response"
    assert answer["status"] == "ok"
    assert answer["response_id"] == "req-42"
    assert answer["result"] == {"os": "linux", "cores": 4}
    assert answer["error"] is None
    await device.nothing()


async def test_device_info_for_an_unknown_device_is_the_not_found_dict(
    server: Server, clients: Clients
) -> None:
    await clients.device("no-info")  # connected, but registered no system_info
    const = await clients.constellation("const-nf")
    for device_id in ("ghost", "no-info"):
        await const.send(
            type="device_info_request",
            status="ok",
            client_type="constellation",
            target_id=device_id,
            request_id=f"q-{device_id}",
        )
        answer = await const.recv()
        assert_server_frame(answer)
        assert (answer["type"], answer["status"]) == ("device_info_response", "ok")
        assert answer["response_id"] == f"q-{device_id}"
        assert answer["result"] == {
            "error": f"Device {device_id} not found or no system info available"
        }


# -- tasks: validation -------------------------------------------------------------------------


async def test_constellation_task_requires_target_id(server: Server, clients: Clients) -> None:
    const = await clients.constellation("const-t1")
    await const.send(**_const_task(const, None, session_id="a@1"))
    assert_error(await const.recv(), "Constellation task requests require target_id")
    assert await _sessions_in_store(server) == []


async def test_constellation_task_target_must_be_connected(
    server: Server, clients: Clients
) -> None:
    const = await clients.constellation("const-t2")
    await const.send(**_const_task(const, "gone-dev", session_id="a@2"))
    assert_error(await const.recv(), "Device 'gone-dev' is not connected")
    assert await _sessions_in_store(server) == []


async def test_constellation_task_target_must_be_a_device(server: Server, clients: Clients) -> None:
    other = await clients.constellation("const-other")
    const = await clients.constellation("const-t3")
    await const.send(**_const_task(const, "const-other", session_id="a@3"))
    assert_error(await const.recv(), "Constellation tasks may only target device clients")
    await other.nothing()
    assert await _sessions_in_store(server) == []


async def test_scoped_constellation_cannot_task_another_device(
    server: Server, clients: Clients
) -> None:
    await clients.device("mine-t")
    other = await clients.device("other-t")
    const = await clients.constellation("const-t4", target_id="mine-t")
    await const.send(**_const_task(const, "other-t", session_id="a@4"))
    frame = await const.recv()
    assert (frame["type"], frame["status"]) == ("error", "error")
    await other.nothing()
    assert await _sessions_in_store(server) == []


async def test_device_may_not_target_another_device(server: Server, clients: Clients) -> None:
    peer = await clients.device("peer-dev")
    device = await clients.device("dev-t5")
    await device.send(**_task(device, target_id="peer-dev", session_id="b@1"))
    assert_error(await device.recv(), "Device clients may not target other devices")
    await peer.nothing()
    await device.nothing()
    assert await _sessions_in_store(server) == []
    # Naming itself is fine.
    await device.send(**_task(device, target_id="dev-t5", session_id="b@2"))
    await _accepted(device, "b@2")
    assert (await device.recv())["type"] == "command"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("../a b", "_a_b"),
        ("..hidden", "hidden"),
        ("ok-Name_1.2", "ok-Name_1.2"),
        ("tâche/ü", "t_che__"),
        ("a\x00b", "a_b"),
    ],
)
async def test_task_name_is_sanitised(
    server: Server, clients: Clients, given: str, expected: str
) -> None:
    device = await clients.device("dev-name")
    await device.send(**_task(device, task_name=given, session_id="n@1"))
    await _accepted(device, "n@1")
    command = await device.recv()
    assert command["task_name"] == expected
    await server.registry.flush()
    rows = await sql(server.database_url, "SELECT task_name FROM sessions")
    assert [row[0] for row in rows] == [expected]


async def test_missing_task_name_and_session_id_get_uuid4s(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-uuid")
    await device.send(type="task", status="continue", request="r", session_id=None)
    ack = await device.recv()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    session_id = ack["session_id"]
    assert uuid.UUID(session_id).version == 4
    command = await device.recv()
    assert command["session_id"] == session_id
    assert uuid.UUID(command["task_name"]).version == 4


async def test_session_owned_by_another_client_is_refused(server: Server, clients: Clients) -> None:
    owner = await clients.device("owner-dev")
    thief = await clients.device("thief-dev")
    await owner.send(**_task(owner, session_id="shared-sid", task_name="mine"))
    await _accepted(owner, "shared-sid")
    command = await owner.recv()

    # While the owner's session runs.
    await thief.send(**_task(thief, session_id="shared-sid", task_name="theirs"))
    refused = await thief.recv()
    assert_error(refused, "session_id 'shared-sid' is owned by another client")
    await thief.nothing()  # nothing runs for the thief
    session = server.registry.get_session("shared-sid")
    assert session is not None
    assert (session.owner_id, session.executor_id) == ("owner-dev", "owner-dev")

    # And after it has ended.
    await owner.send(
        type="command_results",
        status="completed",
        session_id="shared-sid",
        prev_response_id=command["response_id"],
        action_results=[{"status": "success", "result": 1}],
    )
    assert (await owner.recv())["type"] == "task_end"
    thief_const = await clients.constellation("thief-const")
    await thief_const.send(**_const_task(thief_const, "owner-dev", session_id="shared-sid"))
    assert_error(await thief_const.recv(), "session_id 'shared-sid' is owned by another client")
    await owner.nothing()
    rows = await sql(server.database_url, "SELECT owner_id, task_name, state FROM sessions")
    assert [tuple(row) for row in rows] == [("owner-dev", "mine", "completed")]


async def test_owner_cannot_start_a_session_that_is_running(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-twice")
    await device.send(**_task(device, session_id="twice"))
    await _accepted(device, "twice")
    await device.recv()  # the command
    await device.send(**_task(device, session_id="twice"))
    frame = await device.recv()
    assert (frame["type"], frame["status"]) == ("error", "error")
    await device.nothing()


# -- tasks: the session ------------------------------------------------------------------------


async def test_constellation_task_round_trip(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-rt")
    const = await clients.constellation("const-rt", target_id="dev-rt")
    await const.send(**_const_task(const, "dev-rt", session_id="job@7", task_name="job"))
    await _accepted(const, "job@7")

    command = await device.recv()
    assert_server_frame(command)
    assert command["type"] == "command"
    assert command["session_id"] == "job@7"
    assert command["task_name"] == "job"
    response_id = command["response_id"]
    uuid.UUID(response_id)
    # The default runner relays the request and calls no tool (every device answers that).
    assert (command["user_request"], command["actions"]) == ("do something", [])
    await const.nothing()  # the command goes to the executor only

    results = [
        {
            "status": "success",
            "error": None,
            "result": {"answer": 42},
            "namespace": "ns",
            "call_id": "c-1",
        }
    ]
    await device.send(
        type="command_results",
        status="completed",
        client_id="dev-rt",
        session_id="job@7",
        prev_response_id=response_id,
        action_results=results,
    )
    for receiver in (const, device):
        end = await receiver.recv()
        assert_server_frame(end)
        assert end["type"] == "task_end"
        assert end["status"] == "completed"
        assert end["session_id"] == "job@7"
        assert end["error"] is None
        assert end["result"] == results
    await const.nothing()
    await device.nothing()
    rows = await sql(
        server.database_url,
        "SELECT owner_id, executor_id, task_name, state FROM sessions",
    )
    assert [tuple(row) for row in rows] == [("const-rt", "dev-rt", "job", "completed")]


async def test_device_own_task_ends_once_to_the_device(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-self")
    await device.send(**_task(device, session_id="self@1"))
    await _accepted(device, "self@1")
    command = await device.recv()
    await device.send(
        type="command_results",
        status="completed",
        session_id="self@1",
        prev_response_id=command["response_id"],
        action_results=[{"status": "failure", "error": "it broke"}],
    )
    end = await device.recv()
    assert (end["type"], end["status"], end["error"]) == ("task_end", "failed", "it broke")
    await device.nothing()
    await server.registry.flush()
    rows = await sql(server.database_url, "SELECT state FROM sessions")
    assert [row[0] for row in rows] == ["failed"]


async def test_results_from_a_non_executor_are_dropped(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-exec")
    intruder = await clients.device("dev-intruder")
    const = await clients.constellation("const-x")
    await const.send(**_const_task(const, "dev-exec", session_id="x@1"))
    await _accepted(const, "x@1")
    command = await device.recv()
    forged = {
        "type": "command_results",
        "status": "completed",
        "session_id": "x@1",
        "prev_response_id": command["response_id"],
        "action_results": [{"status": "success", "result": "forged"}],
    }
    await intruder.send(**forged)
    await const.send(**forged)
    await const.nothing()
    await intruder.nothing()
    assert server.registry.get_session("x@1") is not None  # still running
    # Results naming another session are dropped too.
    await device.send(**{**forged, "session_id": "other"})
    await const.nothing()
    # The executor's own answer ends it, with the executor's result.
    await device.send(**{**forged, "action_results": [{"status": "success", "result": "real"}]})
    end = await const.recv()
    assert end["type"] == "task_end"
    assert end["result"][0]["result"] == "real"


async def test_bogus_command_results_create_nothing(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-bogus")
    other = await clients.device("dev-bystander")
    for number in range(50):
        await device.send(
            type="command_results",
            status="completed",
            session_id=f"bogus-{number}",
            prev_response_id=str(uuid.uuid4()) if number % 2 else None,
            action_results=[{"status": "success", "result": number}],
        )
    assert (await device.heartbeat())["type"] == "heartbeat"  # all 50 handled by now
    await device.nothing()
    await other.nothing()
    assert await _sessions_in_store(server) == []
    assert await sql(server.database_url, "SELECT link_id FROM session_links") == []
    assert all(server.registry.get_session(f"bogus-{n}") is None for n in range(50))
    assert server.registry.get_device_sessions("dev-bogus") == set()


# -- other messages ----------------------------------------------------------------------------


async def test_error_from_a_client_is_echoed(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-err")
    await device.send(type="error", status="error", error="something went wrong")
    assert_error(await device.recv(), "something went wrong")


async def test_unknown_message_type(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-unknown")
    await device.send(type="teleport", status="ok")
    assert_error(await device.recv(), "Unknown message type: teleport")
    await device.send_raw(json.dumps({"type": "fly", "client_id": "dev-unknown"}))
    assert_error(await device.recv(), "Unknown message type: fly")
    assert (await device.heartbeat())["type"] == "heartbeat"


async def test_second_register_on_a_connection_changes_nothing(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-once")
    await device.send(type="register", status="ok", client_id="dev-once", client_type="device")
    frame = await device.recv()
    assert (frame["type"], frame["status"]) == ("error", "error")
    assert server.registry.get_online_count() == 1
    await server.registry.flush()
    rows = await sql(server.database_url, "SELECT connection_id FROM connections")
    assert len(rows) == 1
