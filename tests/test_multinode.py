"""Two relays and two trackers as real processes on one store: the guarantees must hold across nodes.

Every node is the real CLI (`inflight relay`, `inflight tracker`) in its own process (tests/cluster.py);
apps, recipients and webhook receivers talk to them over loopback sockets. Each guarantee here held
inside one process by construction (one writer, one lock, one event loop); these tests check it holds
when the work for one message is spread over several nodes at the same instant. Each test runs on
both backends (conftest's `store_url`): PostgreSQL, the store for several nodes, and SQLite, whose
WAL file two processes on one box may share.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.cluster import LossyLink, PrivatePostgres, cluster, cluster_config
from tests.conftest import PROJECT_SECRET
from tests.processes import wait_for
from tests.test_faults import attempt, message
from tests.test_flow import events, html_message, send, tracked_urls
from tests.test_webhooks import Receiver, receiver  # noqa: F401 (receiver is a fixture)
from tests.upstreams import FaultySink, faulty_sink

BEARER = {"Authorization": f"Bearer {PROJECT_SECRET}"}
HITS = 200


@pytest.fixture
def sink() -> Iterator[FaultySink]:
    with faulty_sink() as running:
        yield running


def pixel_path(data: bytes) -> str:
    [pixel] = [url for url in tracked_urls(data) if "/o/" in url]
    return urlsplit(pixel).path


async def hit_all_at_once(paths: list[str]) -> Counter[int]:
    """One GET per path, every one on its own connection, all in flight together."""
    limits = httpx.Limits(max_connections=len(paths), max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        answers = await asyncio.gather(*(client.get(path) for path in paths))
    return Counter(answer.status_code for answer in answers)


def test_hits_for_one_message_on_both_trackers_at_once_count_each_open_once(
        tmp_path: Path, store_url: str, sink: FaultySink) -> None:
    config = cluster_config(tmp_path / "inflight.toml", store_url=store_url, upstream_url=sink.url)
    with cluster(tmp_path, config, relays=1, trackers=2) as nodes:
        send(nodes.relays[0].port, html_message())
        path = pixel_path(sink.handler.messages[0].data)
        trackers = nodes.trackers
        urls = [trackers[n % len(trackers)].http_base + path for n in range(HITS)]
        assert asyncio.run(hit_all_at_once(urls)) == {200: HITS}
        # Each tracker's events API waits for its own spool; the other's hits follow within moments.
        wait_for(lambda: len(events(trackers[1], name="email.open", limit="1000")) >= HITS)
        opens = events(trackers[1], name="email.open", limit="1000")
    assert sorted(e["opens"] for e in opens) == list(range(1, HITS + 1))
    assert [e["opens"] for e in opens if e["first"]] == [1]


def test_a_message_retried_through_the_other_relay_goes_upstream_once(
        tmp_path: Path, store_url: str, sink: FaultySink) -> None:
    """The two ways a first attempt ends without the app's 250, each retried through the other relay.

    - the upstream takes the body and drops the connection before its 250 (it keeps nothing):
      relay A answers 4xx, relay B sends the one copy;
    - the upstream accepts, relay A writes its ledger rows and answers 250, but the reply is lost on
      the way to the app (a cut connection, LossyLink): relay B finds the rows and sends nothing.
    """
    config = cluster_config(tmp_path / "inflight.toml", store_url=store_url, upstream_url=sink.url)
    recipients = ["a@example.com", "b@example.com"]
    with cluster(tmp_path, config, relays=2, trackers=0) as nodes:
        first, second = nodes.relays
        sink.handler.drop_after_data = True
        data = message("dropped-before-250")
        assert attempt(first.port, data, recipients) == 451
        sink.handler.drop_after_data = False
        assert attempt(second.port, data, recipients) == 250
        assert sink.handler.copies() == {"a@example.com": 1, "b@example.com": 1}

        with LossyLink(first.port) as link:
            link.lose_next_reply()
            data = message("reply-lost")
            assert attempt(link.port, data, recipients) is None  # connection lost after the dot
            wait_for(lambda: bool(link.lost_replies))
            assert link.lost_replies[0].startswith(b"250 ")
            assert attempt(second.port, data, recipients) == 250
        assert "outcome=already-sent" in second.output()
        assert sink.handler.copies() == {"a@example.com": 2, "b@example.com": 2}  # one per message


def test_a_mode_set_through_one_tracker_applies_to_the_next_message_on_the_other_relay(
        tmp_path: Path, store_url: str, sink: FaultySink) -> None:
    config = cluster_config(tmp_path / "inflight.toml", store_url=store_url, upstream_url=sink.url)
    with cluster(tmp_path, config, relays=2, trackers=2) as nodes:

        def tracked_through(relay: int) -> bool:
            send(nodes.relays[relay].port, html_message())
            return bool(tracked_urls(sink.handler.messages[-1].data))

        assert tracked_through(1)
        changed = httpx.put(f"{nodes.trackers[0].http_base}/v1/settings/tracking", json={"mode": "DISABLED"},
                            headers=BEARER)
        assert changed.status_code == 200 and changed.json()["mode"] == "DISABLED"
        assert not tracked_through(1)
        assert not tracked_through(0)
        seen = httpx.get(f"{nodes.trackers[1].http_base}/v1/settings/tracking", headers=BEARER).json()
        assert seen["mode"] == "DISABLED"
        assert httpx.put(f"{nodes.trackers[1].http_base}/v1/settings/tracking", json={"mode": "ENABLED"},
                         headers=BEARER).status_code == 200
        assert tracked_through(0)


def test_a_tracker_killed_with_webhooks_pending_leaves_every_event_delivered_once_by_key(
        tmp_path: Path, store_url: str, sink: FaultySink, receiver: Receiver) -> None:  # noqa: F811
    """Webhooks pending on every node, POSTs held by the receiver, then one tracker is SIGKILLed.

    Its claimed rows come back when their lease ends (twice `timeout_seconds`) and another node
    delivers them. Delivery is at least once: a POST the receiver got just before the kill may come
    again, always with the same `webhook-id`, so a receiver that remembers ids processes each event once.
    """
    config = cluster_config(tmp_path / "inflight.toml", store_url=store_url, upstream_url=sink.url,
                            webhook_url=receiver.url)
    receiver.hold.clear()  # every POST waits: rows stay claimed by the node that sent them
    with cluster(tmp_path, config, relays=2, trackers=2) as nodes:
        for index in range(4):
            send(nodes.relays[index % 2].port, html_message(to=f"r{index}@example.com"))
        paths = [pixel_path(copy.data) for copy in sink.handler.messages]
        for index, path in enumerate(paths * 3):
            assert httpx.get(nodes.trackers[index % 2].http_base + path).status_code == 200
        # Each tracker's events API waits for its own spool; the other's hits follow within moments.
        wait_for(lambda: len(events(nodes.trackers[1], limit="1000")) >= 4 + 12)
        stored = events(nodes.trackers[1], limit="1000")
        assert len(stored) == 4 + 12
        wait_for(lambda: len(receiver.attempts) >= 8)  # the nodes' workers are holding POSTs
        nodes.trackers[0].kill()
        receiver.hold.set()
        wait_for(lambda: set(receiver.accepted_ids()) >= set(receiver.attempts)
                 and len({e["id"] for _, e in receiver.accepted}) == len(stored), seconds=30)
        time.sleep(1.0)  # several poll periods: nothing more may come
    by_key: dict[str, set[int]] = {}
    for key, event in receiver.accepted:
        by_key.setdefault(key, set()).add(event["id"])
    assert sorted(i for ids in by_key.values() for i in ids) == sorted(e["id"] for e in stored)  # each once, by key
    assert all(len(ids) == 1 for ids in by_key.values())  # one key, one event
    assert receiver.rejected == []


def test_a_retry_through_the_other_relay_while_the_first_attempt_is_still_upstream_is_not_sent_twice(
        tmp_path: Path, store_url: str, sink: FaultySink) -> None:
    """The app's connection to relay A is cut after its dot while A still waits for the upstream's
    reply; the app retries through relay B at once. B must not send a copy A may still deliver."""
    config = cluster_config(tmp_path / "inflight.toml", store_url=store_url, upstream_url=sink.url)
    with cluster(tmp_path, config, relays=2, trackers=0) as nodes:
        first, second = nodes.relays
        sink.handler.data_delay = 2.0
        data = message("retried-while-in-flight")
        with LossyLink(first.port) as link:
            link.lose_next_reply()
            assert attempt(link.port, data, ["a@example.com"]) is None
            codes = [attempt(second.port, data, ["a@example.com"])]
            sink.handler.data_delay = 0.0
            while codes[-1] != 250 and len(codes) < 20:
                time.sleep(0.2)
                codes.append(attempt(second.port, data, ["a@example.com"]))
        assert codes[-1] == 250, codes
        assert sink.handler.copies() == {"a@example.com": 1}, codes


def test_postgresql_restarted_under_load_loses_nothing_duplicates_nothing_and_mail_keeps_flowing(
        tmp_path: Path, sink: FaultySink, private_postgres: PrivatePostgres, capsys: pytest.CaptureFixture[str]) -> None:
    """A real restart (`pg_ctl stop -m fast`, 3 s down, start) of a PostgreSQL server of this test's own
    (tests/cluster.py PrivatePostgres: the shared server on 5432 cannot be restarted under the other
    tests), while an app sends through both relays and recipients open through both trackers.

    The app retries a 4xx or a lost connection as MTAs do. Afterwards: every message reached the
    upstream exactly once and got its 250, the store holds exactly one `email.sent` per message, and
    exactly as many opens as the trackers answered with a pixel, each counted once.
    """
    config = cluster_config(tmp_path / "inflight.toml", store_url=private_postgres.url, upstream_url=sink.url)
    messages = 30
    replies: dict[int, list[int | None]] = {}
    pixels: list[int] = []
    with cluster(tmp_path, config, relays=2, trackers=2) as nodes:

        def app() -> None:
            for index in range(messages):
                data = html_message({"Message-ID": f"<restart-{index}@app.example>"}, to=f"r{index}@example.com")
                codes = replies.setdefault(index, [])
                while (not codes or codes[-1] != 250) and len(codes) < 60:
                    if codes:
                        time.sleep(0.25)
                    codes.append(attempt(nodes.relays[(index + len(codes)) % 2].port, data.as_bytes(),
                                         [f"r{index}@example.com"]))

        def recipients() -> None:  # open the mail delivered so far, in turn, on both trackers, all along
            hit = 0
            while sender.is_alive():
                delivered = list(sink.handler.messages)
                if delivered:
                    path = pixel_path(delivered[hit % len(delivered)].data)
                    try:
                        pixels.append(httpx.get(nodes.trackers[hit % 2].http_base + path, timeout=30).status_code)
                    except httpx.TransportError:
                        pixels.append(0)
                    hit += 1
                time.sleep(0.05)

        sender, opener = threading.Thread(target=app), threading.Thread(target=recipients)
        sender.start()
        opener.start()
        wait_for(lambda: len(replies) > messages // 3, seconds=60)
        private_postgres.stop()
        time.sleep(3)
        private_postgres.start()
        sender.join(180)
        opener.join(60)
        assert not sender.is_alive() and not opener.is_alive()
        sent = []

        def stored() -> bool:
            sent[:] = events(nodes.trackers[0], name="email.sent", limit="1000")
            return len(sent) >= messages

        wait_for(stored, seconds=30)
        opens: list[dict[str, Any]] = []

        def opened() -> bool:
            # A pixel fetched the moment its copy arrived may come before the relay's spool stored the
            # copy's send row: that hit waits in its tracker's spool and is recorded a second or so later.
            opens[:] = events(nodes.trackers[1], name="email.open", limit="1000")
            return len(opens) >= pixels.count(200)

        wait_for(opened, seconds=30)
    copies = sink.handler.copies()
    duplicates = sum(n - 1 for n in copies.values())
    with capsys.disabled():
        seen = Counter(code for codes in replies.values() for code in codes)
        print(f"\nPostgreSQL restart under load: messages={messages} replies={dict(seen)} pixels={dict(Counter(pixels))} "
              f"lost={messages - len(copies)} duplicates={duplicates}")
    assert [codes[-1] for codes in replies.values()] == [250] * messages, replies
    assert copies == {f"r{index}@example.com": 1 for index in range(messages)}
    assert sorted(e["message_id"] for e in sent) == sorted(f"restart-{index}@app.example" for index in range(messages))
    assert len(opens) == pixels.count(200)
    by_message: dict[str, list[int]] = {}
    for event in opens:
        by_message.setdefault(event["message_id"], []).append(event["opens"])
    assert all(sorted(counts) == list(range(1, len(counts) + 1)) for counts in by_message.values()), by_message
