"""``GET /api/stats/hourly`` on a database filled by a real server run: the JSON shape the
dashboard reads, the default window, and refused windows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.operator.conftest import Fleet
from tests.operator.test_rest import get, q, ts

pytestmark = pytest.mark.timeout(60)


async def test_hourly_figures(fleet: Fleet) -> None:
    async with fleet.http() as http:
        body = await get(http, "/api/stats/hourly")
        assert set(body) == {"items", "since", "until"}
        assert ts(body["until"]) - ts(body["since"]) == timedelta(days=1)
        items = body["items"]
        assert len(items) == 24
        assert [ts(item["hour"]) for item in items] == [
            ts(body["since"]) + n * timedelta(hours=1) for n in range(24)
        ]
        for item in items:
            assert set(item) == {
                "hour",
                "connects",
                "disconnects",
                "disconnects_by_reason",
                "connected_seconds",
            }
            assert item["hour"].endswith(("Z", "+00:00")), item["hour"]
        # The scenario: five connections, two of dev-gone's closed ("bye", then "leaving").
        assert sum(item["connects"] for item in items) == 5
        assert sum(item["disconnects"] for item in items) == 2
        reasons: dict[str, int] = {}
        for item in items:
            for reason, count in item["disconnects_by_reason"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        assert reasons == {"bye": 1, "leaving": 1}
        assert sum(item["connected_seconds"] for item in items) > 0

        start = fleet.marks["start"]
        explicit = await get(http, "/api/stats/hourly", since=q(start), until=q(start))
        assert len(explicit["items"]) == 1  # the hour holding that instant
        assert ts(explicit["since"]) <= start < ts(explicit["until"])

        for params in (
            {"since": q(start - timedelta(days=32)), "until": q(start)},
            {"since": q(start), "until": q(start - timedelta(hours=2))},
            {"since": "yesterday"},
        ):
            refused = await http.get("/api/stats/hourly", params=params)
            assert refused.status_code == 422, refused.text
            assert "since" in refused.text
