"""The cost of reading the tracking mode from the store on every message (runtime changes, no restart).

Baseline: one whole untracked message through Pipeline.relay (upstream that accepts at once,
`email.sent` written to a real SQLite file), which includes the read. The ratio is the read's
share of the relay's own work per message, before any network time.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Mode, row
from config.settings import Settings, settings_from_mapping
from config.tracking import TrackingSettings
from relay.pipeline import Pipeline
from relay.upstream import RecipientResult, Results
from store.spool import Spool
from store.sqlite import SqliteEventStore
from tracking.tokens import TokenKeys

MESSAGE = (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n" + b"<p>" + b"x" * 3000 + b"</p>\r\n")


class AcceptingUpstream:
    async def send(self, mail_from: str, recipients: list[str], data: bytes, *, ready: asyncio.Future[Any] | None = None,
                   crlf: bool = False) -> Results:
        if ready is not None:
            await ready
        return dict.fromkeys(recipients, RecipientResult(250, "2.0.0 ok"))

    async def close(self) -> None:
        return None


def _settings(directory: str) -> Settings:
    return settings_from_mapping({
        "store": {"url": f"sqlite:///{directory}/bench.db"},
        "tracker": {"secrets": ["bench-secret-1"]},
        "projects": [{"id": "bench", "secret": "bench-secret", "tracking": "ENABLED"}],
    }, environ={})


async def _per_op_us(operation: object, count: int, rounds: int) -> list[float]:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            await operation()  # type: ignore[operator]
        timings.append((time.perf_counter() - started) / count * 1e6)
    return timings


async def _measure(mode: Mode) -> list[dict[str, Any]]:
    count, rounds = mode.pick(full=(2000, 7), quick=(200, 3), smoke=(20, 1))
    with tempfile.TemporaryDirectory() as directory:
        settings = _settings(directory)
        project = settings.projects[0]
        store = SqliteEventStore(Path(directory) / "bench.db")
        await store.open()
        spool = Spool(settings.store.spool_path, store_url=settings.store.url)
        try:
            tracking = TrackingSettings(settings, store)
            pipeline = Pipeline(settings=settings, upstream=AcceptingUpstream(), store=store,
                                keys=TokenKeys(settings.tracker.secrets, [project.id]), spool=spool)
            await spool.open()
            unset = await _per_op_us(lambda: tracking.mode(project), count, rounds)
            await tracking.change(project, "DISABLED", by="bench")
            stored = await _per_op_us(lambda: tracking.mode(project), count, rounds)
            relayed = await _per_op_us(lambda: pipeline.relay(project, "app@example.com", ["a@example.com"], MESSAGE),
                                       max(count // 4, 50), rounds)
        finally:
            await spool.close()
            await store.close()
    baseline = ("relay untracked 3 KB msg (baseline)", relayed)
    return [
        row("tracking_mode", "mode read, TOML default (no row)", "us", unset, baseline=baseline, max_ratio=0.2),
        row("tracking_mode", "mode read, stored row", "us", stored, baseline=baseline, max_ratio=0.2),
        row("tracking_mode", baseline[0], "us", relayed),
    ]


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    return asyncio.run(_measure(Mode(quick, smoke)))
