"""Webhooks against a real receiver on a real socket: signed, at least once, exactly once by key, across restarts."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from store import open_store
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.processes import ROOT, wait_for
from tests.test_flow import events, fetch, html_message, send, tracked_urls
from tracker.webhooks import retry_delay, signature, signing_key

SECRET = "receiver-secret-0123456789"
FAST_RETRIES = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2, "poll_seconds": 0.05, "timeout_seconds": 2.0}


def readme_verifier() -> Callable[..., dict[str, Any]]:
    """The verification snippet exactly as README.md documents it."""
    block = re.search(r"```python\n(# verify-webhook.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md lost its webhook verification snippet"
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)
    return namespace["verify_webhook"]  # type: ignore[no-any-return]


class Receiver:
    """A webhook endpoint: answers 503 while `down`, holds requests while `hold` is clear, else 200."""

    def __init__(self) -> None:
        self.down = False
        self.hold = threading.Event()
        self.hold.set()
        self.attempts: list[str] = []  # webhook-id of every request, in arrival order
        self.accepted: list[tuple[str, dict[str, Any]]] = []  # (webhook-id, verified event) answered 200
        self.rejected: list[str] = []  # signature or freshness failures
        self._lock = threading.Lock()
        verify = readme_verifier()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.attempts.append(headers["webhook-id"])
                receiver.hold.wait(10)
                try:
                    event = verify(SECRET, headers, body)
                except ValueError as exc:
                    receiver.rejected.append(str(exc))
                    self.send_response(400)
                else:
                    if receiver.down:
                        self.send_response(503)
                    else:
                        with receiver._lock:
                            receiver.accepted.append((headers["webhook-id"], event))
                        self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/inflight"

    def accepted_ids(self) -> Counter[str]:
        with self._lock:
            return Counter(key for key, _ in self.accepted)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.thread.start()
    try:
        yield running
    finally:
        running.hold.set()
        running.server.shutdown()
        running.server.server_close()


def hooked_settings(tmp_path: Path, sink: Sink, receiver: Receiver, store_url: str | None = None):  # type: ignore[no-untyped-def]
    project = {"id": PROJECT, "secret": PROJECT_SECRET, "webhook_url": receiver.url, "webhook_secret": SECRET}
    store = {"url": store_url} if store_url else {}
    return make_settings(tmp_path, sink.url, projects=[project], webhooks=FAST_RETRIES, store=store)


def outbox_rows(where: Path | str) -> int:
    """Rows left in the outbox (a store URL, or the test's SQLite directory), read as another process would."""
    if isinstance(where, Path):
        with sqlite3.connect(where / "inflight.db") as db:
            return int(db.execute("SELECT count(*) FROM webhook_outbox").fetchone()[0])

    async def count() -> int:
        store = open_store(where)
        await store.open()
        try:
            return await store.pending_webhooks()
        finally:
            await store.close()

    return asyncio.run(count())


def engage(service: RunningService, sink: Sink) -> None:
    """A send, two opens and a click: four events, plus none implied."""
    send(service.smtp_port, html_message({"X-Inflight-Campaign": "spring"}))
    click_url, pixel_url = tracked_urls(sink.messages[-1].data)
    assert fetch(service, pixel_url).status_code == 200
    assert fetch(service, pixel_url).status_code == 200
    assert fetch(service, click_url).status_code == 302


def test_receiver_that_fails_then_recovers_gets_every_event_exactly_once(
    tmp_path: Path, sink: Sink, receiver: Receiver, store_url: str
) -> None:
    receiver.down = True
    with RunningService(hooked_settings(tmp_path, sink, receiver, store_url)) as service:
        engage(service, sink)
        stored = events(service)
        assert [e["name"] for e in stored] == ["email.click", "email.open", "email.open", "email.sent"]
        wait_for(lambda: len(set(receiver.attempts)) == 4 and len(receiver.attempts) >= 12)  # each retried
        receiver.down = False
        wait_for(lambda: len(receiver.accepted_ids()) == 4)
        wait_for(lambda: outbox_rows(store_url) == 0)  # each delivered row is removed once its POST was accepted
        time.sleep(0.5)  # several poll and backoff periods: nothing more may arrive
        assert sorted(receiver.accepted_ids().values()) == [1, 1, 1, 1]
        # Every attempt of one event carried the same key; every delivery is exactly the events API JSON.
        assert set(receiver.attempts) == set(receiver.accepted_ids())
        assert sorted((e for _, e in receiver.accepted), key=lambda e: e["id"]) == sorted(stored, key=lambda e: e["id"])
        assert receiver.rejected == []


def test_restart_in_the_middle_of_retries_loses_nothing(tmp_path: Path, sink: Sink, receiver: Receiver, store_url: str) -> None:
    receiver.down = True
    settings = hooked_settings(tmp_path, sink, receiver, store_url)
    with RunningService(settings) as service:
        engage(service, sink)
        stored = events(service)
        wait_for(lambda: all(n >= 2 for n in Counter(receiver.attempts).values()) and len(set(receiver.attempts)) == 4)
    before = set(receiver.attempts)
    receiver.down = False
    with RunningService(settings):
        wait_for(lambda: len(receiver.accepted_ids()) == 4)
        wait_for(lambda: outbox_rows(store_url) == 0)  # removed once accepted, before this service stops
        time.sleep(0.5)  # several poll periods: nothing more may arrive
    assert set(receiver.accepted_ids()) == before
    assert outbox_rows(store_url) == 0
    assert sorted(receiver.accepted_ids().values()) == [1, 1, 1, 1]
    assert sorted(e["id"] for _, e in receiver.accepted) == sorted(e["id"] for e in stored)


def test_a_hung_receiver_never_delays_the_pixel_or_the_redirect(tmp_path: Path, sink: Sink, receiver: Receiver) -> None:
    receiver.hold.clear()
    with RunningService(hooked_settings(tmp_path, sink, receiver)) as service:
        send(service.smtp_port, html_message())
        wait_for(lambda: len(receiver.attempts) == 1)  # the email.sent POST is being held
        click_url, pixel_url = tracked_urls(sink.messages[0].data)
        assert fetch(service, pixel_url, timeout=2).status_code == 200
        assert fetch(service, click_url, timeout=2).status_code == 302
        assert not receiver.hold.is_set() and receiver.accepted == []
        receiver.hold.set()
        wait_for(lambda: len(receiver.accepted_ids()) == 3)
        wait_for(lambda: outbox_rows(tmp_path) == 0)


def test_projects_without_webhook_queue_nothing(tmp_path: Path, sink: Sink, receiver: Receiver) -> None:
    other = {"id": "other", "secret": "other-secret", "webhook_url": receiver.url, "webhook_secret": SECRET}
    settings = make_settings(tmp_path, sink.url, projects=[{"id": PROJECT, "secret": PROJECT_SECRET}, other],
                             webhooks=FAST_RETRIES)
    with RunningService(settings) as service:
        send(service.smtp_port, html_message())
        assert len(events(service)) == 1
        time.sleep(0.3)
    assert receiver.attempts == []


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The vector published with the Standard Webhooks specification (standard-webhooks/standard-webhooks).
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def test_readme_snippet_refuses_forgery_and_replay() -> None:
    verify = readme_verifier()
    body, now = b'{"id":1}', int(time.time())
    good = {"webhook-id": "evt_1", "webhook-timestamp": str(now),
            "webhook-signature": signature(signing_key(SECRET), "evt_1", now, body)}
    assert verify(SECRET, good, body) == {"id": 1}
    with pytest.raises(ValueError, match="signature"):
        verify(SECRET, good, b'{"id":2}')
    with pytest.raises(ValueError, match="signature"):
        verify("another-secret-0123456789", good, body)
    with pytest.raises(ValueError, match="timestamp"):
        verify(SECRET, good, body, now=now + 301)


def test_retry_delays_double_up_to_the_cap() -> None:
    delays = [retry_delay(n, initial=10, maximum=3600) for n in range(1, 40)]
    assert 8 <= delays[0] <= 10 and 16 <= delays[1] <= 20 and 64 <= delays[3] <= 80
    assert all(2880 <= d <= 3600 for d in delays[12:])


def test_given_up_deliveries_become_dead_letters_listed_and_replayable(tmp_path: Path, sink: Sink, receiver: Receiver) -> None:
    receiver.down = True
    auth = {"Authorization": f"Bearer {PROJECT_SECRET}"}
    with RunningService(hooked_settings(tmp_path, sink, receiver)) as service:
        send(service.smtp_port, html_message())
        wait_for(lambda: len(receiver.attempts) >= 2)  # failing and being retried
        # The event was recorded longer ago than retry_hours (72): the next failure gives it up.
        with sqlite3.connect(tmp_path / "inflight.db") as db:
            db.execute("UPDATE webhook_outbox SET created = created - 73 * 3600")
        wait_for(lambda: outbox_rows(tmp_path) == 0)
        listed = httpx.get(f"{service.http_base}/v1/webhooks/dead-letters", headers=auth)
        [letter] = listed.json()["dead_letters"]
        assert letter["project"] == PROJECT and letter["last_error"] == "HTTP 503" and letter["attempts"] >= 2
        assert letter["key"] == receiver.attempts[0]
        assert httpx.get(f"{service.http_base}/v1/webhooks/dead-letters").status_code == 401
        other = httpx.post(f"{service.http_base}/v1/webhooks/dead-letters/999/replay", headers=auth)
        assert other.status_code == 404

        receiver.down = False
        replayed = httpx.post(f"{service.http_base}/v1/webhooks/dead-letters/{letter['id']}/replay", headers=auth)
        assert replayed.status_code == 202
        wait_for(lambda: len(receiver.accepted_ids()) == 1)
        assert receiver.accepted_ids() == Counter({letter["key"]: 1})  # the same webhook-id: receivers dedupe
        assert httpx.get(f"{service.http_base}/v1/webhooks/dead-letters", headers=auth).json()["dead_letters"] == []
        assert httpx.post(f"{service.http_base}/v1/webhooks/dead-letters/{letter['id']}/replay",
                          headers=auth).status_code == 404
