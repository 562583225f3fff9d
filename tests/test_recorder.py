"""Storing hits (tracker/recorder.py) in this process and in a process of its own
(tracker/recorder_process.py), on a real SQLite store: what is stored, what comes back to the
answering process, and a recorder process that dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from config.settings import Settings
from inflight.service import Service
from store import open_store
from store.model import EventQuery, EventStore
from tests.conftest import PROJECT, free_port, make_settings
from tracker import recorder_process
from tracker.agents import Hit
from tracker.recorder import HitRecorder
from tracker.recorder_process import RecorderProcess, RecordingFailed
from tracker.spooled import SpooledHit, new_uid
from tracking.claims import TrackedSend, TrackingClaims
from tracking.tokens import new_send_id


def hit_payload(send_id: bytes, link: str) -> bytes:
    """A hit's journal record as the tracker writes it (Spool.append: JSON [kind, body])."""
    claims = TrackingClaims(kind="click", project=PROJECT, send_id=send_id, link=link)
    hit = Hit(kind="click", at=1_780_000_100.0, ip="192.0.2.7", user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0")
    return json.dumps(["hit", SpooledHit.body(claims, hit)]).encode()


@asynccontextmanager
async def store_with_copies(settings: Settings, count: int) -> AsyncIterator[tuple[EventStore, list[bytes]]]:
    """The settings' store, opened, with `count` copies stored as the relay stores them; their send ids."""
    store = open_store(settings.store.url)
    await store.open()
    copies = [(new_send_id(), TrackedSend(project=PROJECT, message_id=f"m{i}@recorder.test", contact=f"c{i}@example.com",
                                          recipient=f"c{i}@example.com", sent_at=1_780_000_000)) for i in range(count)]
    await store.record_sends(copies)
    try:
        yield store, [send_id for send_id, _ in copies]
    finally:
        await store.close()


async def stored_links(store: EventStore) -> list[str]:
    events = await store.events(EventQuery(project=PROJECT, name="email.click", limit=1000))
    return sorted(str(event["link"]) for event in events)


def test_a_batch_is_stored_and_what_is_left_comes_back(tmp_path: Path) -> None:
    """Readable hits on known copies are stored and counted; a hit on a copy the store does not have
    yet comes back to be spooled again; a record no hit reads comes back to be set aside."""
    settings = make_settings(tmp_path, "outbox:///dev/null")

    async def scenario() -> None:
        async with store_with_copies(settings, 2) as (store, send_ids):
            recorder = HitRecorder(settings, store)
            unknown = new_send_id()
            recorded = await recorder.record([hit_payload(send_ids[0], "https://example.com/a"),
                                              hit_payload(unknown, "https://example.com/later"),
                                              b'["hit", {"claims": 1}]',
                                              hit_payload(send_ids[1], "https://example.com/b")])
            assert await stored_links(store) == ["https://example.com/a", "https://example.com/b"]
            assert sum(recorded.hits.values()) == 2 and recorded.store_seconds is not None  # one store call a batch
            assert [body["claims"]["send_id"] for body in recorded.deferred] == [unknown.hex()]
            assert recorded.deferred[0]["missing_since"] is not None
            assert [payload for payload, _ in recorded.unreadable] == [b'["hit", {"claims": 1}]']
            assert not recorded.only_waiting
            waiting = await recorder.record([hit_payload(unknown, "https://example.com/later")])
            assert waiting.only_waiting and not waiting.hits

    asyncio.run(scenario())


def test_the_recorder_process_stores_in_its_own_process_and_a_killed_one_is_replaced(tmp_path: Path, store_url: str) -> None:
    """The child stores with its own connection (its pid is not ours); SIGKILLed, the batch in hand
    fails as a store failure does (the spool keeps it and retries) and the next batch goes to a new child.
    Storing a batch again (the retry of one the dead child may have stored) stores it once."""
    settings = make_settings(tmp_path, "outbox:///dev/null", store={"url": store_url})

    async def scenario() -> None:
        async with store_with_copies(settings, 3) as (store, send_ids):
            recorder = RecorderProcess(settings)
            await recorder.start()
            try:
                first = recorder.pid
                assert first is not None and first != os.getpid()
                batch = [hit_payload(send_ids[0], "https://example.com/a")]
                recorded = await recorder.record(batch)
                assert sum(recorded.hits.values()) == 1
                os.kill(first, signal.SIGKILL)
                with pytest.raises(RecordingFailed, match="lost"):
                    await recorder.record([hit_payload(send_ids[1], "https://example.com/b")])
                again = await recorder.record([*batch, hit_payload(send_ids[1], "https://example.com/b"),
                                               hit_payload(send_ids[2], "https://example.com/c")])
                assert recorder.pid not in (None, first)
                assert sum(again.hits.values()) == 3  # recorded again: the store keeps one event per uid
                assert await stored_links(store) == ["https://example.com/a", "https://example.com/b", "https://example.com/c"]
            finally:
                await recorder.close()
            assert recorder.pid is None

    asyncio.run(scenario())


def test_a_store_the_recorder_process_cannot_open_fails_its_start_with_the_reason(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "outbox:///dev/null", store={"url": f"sqlite:///{tmp_path}/missing/dir/x.db"})
    (tmp_path / "missing").write_text("a file where the store's folder should be")

    async def scenario() -> None:
        with pytest.raises(RecordingFailed, match="did not start"):
            await RecorderProcess(settings).start()

    asyncio.run(scenario())


def test_event_uids_of_a_forked_worker_share_no_prefix_with_its_parent() -> None:
    """Workers are forked from one supervisor: a uid drawn before the fork must not be reused after it."""
    parent_uid = new_uid()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writer, new_uid().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    child_uid = os.read(reader, 64).decode()
    os.close(reader)
    assert len(child_uid) == len(parent_uid) == 32 and child_uid[:16] != parent_uid[:16]
    assert new_uid()[:16] == parent_uid[:16]  # the parent goes on with its own


def test_a_tracker_whose_recorder_process_cannot_start_does_not_start_and_lets_go_of_its_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    settings = make_settings(tmp_path, "outbox:///dev/null", tracker={"listen": f"127.0.0.1:{port}"})
    monkeypatch.setattr(recorder_process.sys, "executable", "/bin/false")  # a child that exits at once

    async def scenario() -> None:
        with pytest.raises(RecordingFailed, match="did not start"):
            await Service(settings, relay=False).start()

    asyncio.run(scenario())
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the listener was closed
