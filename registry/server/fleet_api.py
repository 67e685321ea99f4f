"""Operator routes under ``/api`` for the fleet as a whole (what the dashboard's overview
shows): this node's store, the server runs with their connections open now, the connections
open on every node, and the latest disconnects."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from registry.history import DEFAULT_LIMIT, NORMAL_CLOSE_REASONS
from registry.server.api import API_ERRORS, STORE_DOWN, RegistryDep, Text, require_api_key
from registry.server.history_api import Cursor, HistoryDep, Limit, Since, Until, _utc
from registry.types import ClientType, ConnectionRecord, NodeRecord, Page


class StoreStatus(BaseModel):
    """How this node's writes to the store are going (``/api/health`` says the same in one
    word; ``/metrics`` has the counters)."""

    healthy: bool
    #: Why the store is not keeping up (a failing or stalled commit, a full journal), or None.
    error: str | None
    #: Operations accepted and not yet committed, and the depth at which new work is refused.
    journal_depth: int
    journal_limit: int
    #: Operations refused at the limit since start, by what was refused.
    refused: dict[str, int]
    commits: int
    committed_operations: int


def create_fleet_router() -> APIRouter:
    router = APIRouter(
        prefix="/api",
        dependencies=[Depends(require_api_key)],
        responses=API_ERRORS | STORE_DOWN,
    )

    @router.get("/store")
    async def store(registry: RegistryDep) -> StoreStatus:
        """This node's store: healthy or why not, and its journal's depth and limit."""
        journal = registry.journal
        fault = journal.fault()
        return StoreStatus(
            healthy=fault is None,
            error=fault,
            journal_depth=journal.depth,
            journal_limit=journal.limit,
            refused=dict(journal.refused),
            commits=journal.commits,
            committed_operations=journal.committed_operations,
        )

    @router.get("/nodes")
    async def nodes(
        history: HistoryDep,
        running: Annotated[bool, Query(description="Only runs that have not stopped.")] = False,
    ) -> list[NodeRecord]:
        """Server runs, newest first (at most 1000), each with its open connections now."""
        return await history.nodes(running_only=running)

    @router.get("/online")
    async def online(
        history: HistoryDep,
        client_type: Annotated[
            ClientType | None, Query(alias="type", description="Only devices or constellations.")
        ] = None,
        platform: Annotated[
            Text | None, Query(description="Only this platform (any case).")
        ] = None,
        node: Annotated[Text | None, Query(description="Only connections of this node id.")] = None,
        q: Annotated[
            Text | None, Query(description="Client ids containing this (any case).")
        ] = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[ConnectionRecord]:
        """The connections open now on every node, newest first (the store's view: a
        connection shows once its registration is committed)."""
        return await history.open_connections(
            client_type=client_type,
            platform=platform,
            node_id=node,
            search=q,
            limit=limit,
            cursor=cursor,
        )

    @router.get("/disconnects")
    async def disconnects(
        history: HistoryDep,
        abnormal: Annotated[
            bool,
            Query(description=f"Only reasons other than {', '.join(NORMAL_CLOSE_REASONS)}."),
        ] = False,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[ConnectionRecord]:
        """Closed connections on every node, newest close first."""
        return await history.disconnects(
            abnormal=abnormal, since=_utc(since), until=_utc(until), limit=limit, cursor=cursor
        )

    return router
