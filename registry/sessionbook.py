"""The session book: this node's sessions and their links to clients, kept in the live map and
journalled through the node run's recorder.

It binds and unbinds clients (the reference's session maps), ends and forgets sessions,
opens them with the ownership and finality checks of :meth:`Registry.open_session`, and
interrupts the active ones when the run stops.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from registry import closes
from registry.audit import AuditKind
from registry.errors import InvalidArgumentError, SessionFinishedError, SessionOwnershipError
from registry.livemap import DeviceInfoEntry, LiveMap
from registry.noderun import NodeRun
from registry.recovery import RecoveredState
from registry.types import LinkRole, SessionInfo, SessionState
from registry.validation import free_text, require_id

#: The reference's name for the client argument of each session map's methods.
_ROLE_ARGUMENT = {LinkRole.CONSTELLATION: "constellation_id", LinkRole.DEVICE: "device_id"}


class SessionBook:
    """Session bookkeeping over ``live`` (shared with the registry) for ``run``."""

    __slots__ = ("_live", "_run")

    def __init__(self, live: LiveMap[Any], run: NodeRun) -> None:
        self._live = live
        self._run = run

    def load(self, state: RecoveredState) -> None:
        """Take in what recovery read back: interrupted sessions, their links, device info."""
        self._live.sessions.update(state.sessions)
        for session_id, role, client_id, link_id in state.links:
            self._live.bind(role, client_id, session_id, link_id)
        for device_id, (document, digest) in state.device_info.items():
            self._live.device_info[device_id] = DeviceInfoEntry(document, digest)

    # -- the reference's session maps ------------------------------------------------------

    def bind(self, role: LinkRole, client_id: str, session_id: str) -> int | None:
        """Link ``session_id`` to ``client_id`` in ``role``'s map (creating the session when
        new); the sequence of the last row, or None if it was already linked."""
        client_id = require_id(_ROLE_ARGUMENT[role], client_id)
        session_id = require_id("session_id", session_id)
        self._run.check_open()
        at = datetime.now(UTC)
        session = self._live.sessions.get(session_id)
        if session is None:
            session = SessionInfo(
                session_id=session_id,
                owner_id=client_id,
                executor_id=client_id if role is LinkRole.DEVICE else None,
                task_name=None,
                state=SessionState.ACTIVE,
                created_at=at,
            )
            self._record(session, kind=None, at=at)
        elif role is LinkRole.DEVICE and session.executor_id is None:
            self._record(session, executor_id=client_id, kind=None, at=at)
        link_id = str(uuid.uuid4())
        if not self._live.bind(role, client_id, session_id, link_id):
            return None
        recorder = self._run.recorder
        recorder.link_open(link_id, session_id, client_id, role, at)
        return recorder.audit(
            AuditKind.SESSION_BOUND, at, client_id=client_id, session_id=session_id, role=role
        )

    def unbind_client(self, role: LinkRole, client_id: str) -> None:
        """Drop every link of ``client_id`` in ``role``'s map; a session left without links
        ends (see :meth:`_forget`)."""
        client_id = require_id(_ROLE_ARGUMENT[role], client_id)
        self._run.check_removable()
        if client_id not in self._live.session_maps[role]:
            return
        self._run.check_open()
        recorder = self._run.recorder
        at = datetime.now(UTC)
        for session_id, link_id in self._live.unbind_client(role, client_id):
            recorder.link_close(link_id, at)
            recorder.audit(
                AuditKind.SESSION_UNBOUND, at, client_id=client_id, session_id=session_id, role=role
            )
            if session_id not in self._live.links:
                self._forget(session_id, at)

    def _forget(self, session_id: str, at: datetime) -> None:
        """Drop a session left without links; a live one ends ``cancelled``: an interrupted
        one too, since its owner finds it only through its links."""
        session = self._live.sessions.pop(session_id, None)
        if session is not None:
            self._record(
                session,
                state=SessionState.CANCELLED,
                ended_at=at,
                end_reason=closes.SESSION_UNLINKED,
                kind=AuditKind.SESSION_ENDED,
                at=at,
            )

    def end(self, session_id: str, state: SessionState | str, reason: str | None) -> int | None:
        """Unlink ``session_id`` and end it in the final ``state``; None if not live."""
        try:
            final = SessionState(state)
        except ValueError:
            final = SessionState.ACTIVE
        if not final.is_final:
            raise InvalidArgumentError(
                "state",
                f"must be completed, failed or cancelled, not {state!r} "
                "(a session is interrupted only by its server run stopping)",
            )
        reason = free_text("reason", reason)
        session_id = require_id("session_id", session_id)
        self._run.check_removable()
        session = self._live.sessions.get(session_id)
        if session is None:
            return None
        self._run.check_open()
        recorder = self._run.recorder
        at = datetime.now(UTC)
        sequence = None
        for role, client_id, link_id in self._live.unbind_session(session_id):
            recorder.link_close(link_id, at)
            sequence = recorder.audit(
                AuditKind.SESSION_UNBOUND, at, client_id=client_id, session_id=session_id, role=role
            )
        del self._live.sessions[session_id]
        if not session.state.is_final:
            sequence = self._record(
                session,
                state=final,
                ended_at=at,
                end_reason=reason,
                kind=AuditKind.SESSION_ENDED,
                at=at,
            )
        return sequence

    def interrupt_all(self) -> None:
        """Mark every active session ``interrupted`` (the run is stopping)."""
        for session in list(self._live.sessions.values()):
            if session.state is SessionState.ACTIVE:
                self._record(
                    session,
                    state=SessionState.INTERRUPTED,
                    end_reason=closes.SESSION_SERVER_SHUTDOWN,
                    kind=AuditKind.SESSION_INTERRUPTED,
                    at=datetime.now(UTC),
                )

    def _record(
        self, session: SessionInfo, *, kind: AuditKind | None, at: datetime, **changes: Any
    ) -> int:
        """Record ``session`` with ``changes`` in memory (while not final) and in the journal,
        audited as ``kind`` unless None."""
        if changes:
            session = dataclasses.replace(session, **changes)
        if not session.state.is_final:
            self._live.sessions[session.session_id] = session
        recorder = self._run.recorder
        sequence = recorder.session(session)
        if kind is not None:
            sequence = recorder.audit(
                kind,
                at,
                client_id=session.owner_id,
                session_id=session.session_id,
                state=session.state.value,
                reason=session.end_reason,
            )
        return sequence

    # -- reads -----------------------------------------------------------------------------

    def counts(self) -> dict[SessionState, int]:
        return dict(Counter(session.state for session in self._live.sessions.values()))

    def interrupted_of(self, client_id: str) -> list[SessionInfo]:
        found = []
        for session_id in self._live.sessions_of(client_id):
            session = self._live.sessions.get(session_id)
            if (
                session is not None
                and session.owner_id == client_id
                and session.state is SessionState.INTERRUPTED
            ):
                found.append(session)
        return found

    # -- the session lifecycle (server) ----------------------------------------------------

    async def open(
        self, session_id: str, owner_id: str, executor_id: str, task_name: str | None
    ) -> SessionInfo:
        """:meth:`Registry.open_session` (its docstring states the contract)."""
        session_id = require_id("session_id", session_id)
        owner_id = require_id("owner_id", owner_id)
        executor_id = require_id("executor_id", executor_id)
        if task_name is not None:
            task_name = require_id("task_name", task_name)
        journal = self._run.journal
        journal.admit("session")
        if session_id not in self._live.sessions:
            await self._check_stored(session_id, owner_id)
        existing = self._live.sessions.get(session_id)  # again: the await may have let one in
        if existing is not None and existing.owner_id != owner_id:
            raise SessionOwnershipError(session_id, existing.owner_id)
        at = datetime.now(UTC)
        session = SessionInfo(
            session_id=session_id,
            owner_id=owner_id,
            executor_id=executor_id,
            task_name=task_name,
            state=SessionState.ACTIVE,
            created_at=existing.created_at if existing else at,
        )
        first = journal.last_sequence + 1
        sequence = self._record(session, kind=AuditKind.SESSION_OPENED, at=at)
        if owner_id != executor_id:
            sequence = self.bind(LinkRole.CONSTELLATION, owner_id, session_id) or sequence
        sequence = self.bind(LinkRole.DEVICE, executor_id, session_id) or sequence
        opening = range(first, journal.last_sequence + 1)
        try:
            await journal.wait(sequence)
        except BaseException:
            # Not durable in time (the caller timed out or was cancelled): the session will
            # not run.
            self._withdraw(session, opening, was_live=existing is not None)
            raise
        return session

    async def _check_stored(self, session_id: str, owner_id: str) -> None:
        """Refuse a session id that the store knows as another client's, or as ended."""
        # The session's earlier rows may still be queued: read them once they are in.
        await self._run.journal.flush()
        stored = await self._run.history.session_status(session_id)
        if stored is not None:
            stored_owner, stored_state = stored
            if stored_owner is not None and stored_owner != owner_id:
                raise SessionOwnershipError(session_id, stored_owner)
            if stored_state.is_final:
                raise SessionFinishedError(session_id, stored_state.value)

    def _withdraw(self, session: SessionInfo, opening: Sequence[int], *, was_live: bool) -> None:
        """Undo the opening of ``session`` (the operations ``opening``), which was not durable
        in time, unless the session has been taken over meanwhile.

        A session new to this node is forgotten and none of its opening is ever written,
        unless that was committed meanwhile; then (and for a session that was live before
        this opening) it ends ``failed`` (reason ``store_unavailable``).
        """
        session_id = session.session_id

        def end() -> None:
            if self._live.sessions.get(session_id) is session:
                self.end(session_id, SessionState.FAILED, closes.SESSION_NOT_DURABLE)

        def forget() -> None:
            if self._live.sessions.get(session_id) is session:
                self._live.unbind_session(session_id)
                del self._live.sessions[session_id]

        if was_live:
            end()
        else:
            self._run.journal.retract(opening, committed=end, dropped=forget)
