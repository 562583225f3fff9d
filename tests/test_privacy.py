"""What is kept about a person: IP truncation, retention purge in the running service."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import IpMode
from store.model import EventQuery, rfc3339
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.test_flow import events
from tests.test_store import opened, sent
from tracker.privacy import stored_ip


@pytest.mark.parametrize(
    ("ip", "mode", "expected"),
    [
        ("198.51.100.23", IpMode.FULL, "198.51.100.23"),
        ("198.51.100.23", IpMode.TRUNCATED, "198.51.100.0"),
        ("198.51.100.23", IpMode.NONE, None),
        ("2001:db8:abcd:12::1", IpMode.TRUNCATED, "2001:db8:abcd::"),
        ("2001:db8:ab:ffff:ffff::1", IpMode.TRUNCATED, "2001:db8:ab::"),
        ("::ffff:198.51.100.23", IpMode.TRUNCATED, "198.51.100.0"),  # IPv4 client on a dual-stack socket
        ("not-an-ip", IpMode.TRUNCATED, None),  # nothing to truncate safely: keep nothing
        ("not-an-ip", IpMode.FULL, "not-an-ip"),
        (None, IpMode.TRUNCATED, None),
    ],
)
def test_stored_ip(ip: str | None, mode: IpMode, expected: str | None) -> None:
    assert stored_ip(ip, mode) == expected


def test_retention_purge_runs_in_the_background(tmp_path: Path, sink: Sink) -> None:
    now = datetime.now(UTC)

    async def seed() -> None:
        async with opened(tmp_path / "inflight.db") as store:
            await store.record([
                replace(sent("old", "a@example.com"), project=PROJECT, at=rfc3339(now - timedelta(days=8))),
                replace(sent("new", "a@example.com"), project=PROJECT, at=rfc3339(now - timedelta(days=6))),
                replace(sent("kept", "a@example.com"), project="other", at=rfc3339(now - timedelta(days=800))),
            ])

    asyncio.run(seed())
    projects = [{"id": PROJECT, "secret": PROJECT_SECRET, "retention_days": 7},
                {"id": "other", "secret": "other-secret"}]
    settings = make_settings(tmp_path, sink.url, projects=projects, store={"purge_interval_seconds": 0.05})
    with RunningService(settings) as service:
        deadline = time.monotonic() + 10
        while [e["message_id"] for e in events(service)] != ["new"]:
            assert time.monotonic() < deadline, "old events were not purged"
            time.sleep(0.05)
        assert len(service.service.purge.retention_days) == 1  # a project with 0 keeps everything

    async def remaining() -> list[str]:
        async with opened(tmp_path / "inflight.db") as store:
            return [e["message_id"] for e in await store.events(EventQuery(project="other"))]

    assert asyncio.run(remaining()) == ["kept"]
