"""Delivery through the real relay: partial failures, the idempotency ledger, timeouts, fallbacks, draining."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.upstream import INLINE_BYTES
from store import spool as spool_module
from store.model import Delivered
from store.spool import read_frames
from store.sqlite import SqliteEventStore
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, free_port, make_settings
from tests.test_dkim import SELECTOR, verified
from tests.upstreams import FaultySink, faulty_sink

HTML = '<html><body><a href="https://example.com/x">x</a></body></html>'


def message(message_id: str | None = "<m1@app.example>", html: bool = True) -> bytes:
    head = f"Message-ID: {message_id}\r\n" if message_id else ""
    if not html:
        return (f"From: app@example.com\r\nTo: team@example.com\r\nSubject: plain\r\n{head}\r\nno links here\r\n").encode()
    return (f"From: app@example.com\r\nTo: team@example.com\r\nSubject: hello\r\n{head}MIME-Version: 1.0\r\n"
            f"Content-Type: text/html; charset=utf-8\r\n\r\n{HTML}\r\n").encode()


def send(port: int, data: bytes, recipients: list[str]) -> tuple[int, str]:
    """One app transaction; the DATA reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.mail("app@example.com")
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, text
        code, reply = client.data(data)
        return code, reply.decode()


def events(service: RunningService, name: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{service.http_base}/v1/events", params={"name": name},
                         headers={"Authorization": f"Bearer {PROJECT_SECRET}"})
    assert response.status_code == 200, response.text
    return response.json()["events"]


@pytest.fixture
def faulty() -> Iterator[FaultySink]:
    with faulty_sink() as sink:
        yield sink


def running(tmp_path: Path, url: str, **upstream: Any) -> RunningService:
    return RunningService(make_settings(tmp_path, url, upstream={"url": url, **upstream}))


def test_partial_temporary_failure_defers_and_the_retry_sends_only_the_rest(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.rcpt_replies = {"b@example.com": "452 4.2.2 mailbox full"}
    recipients = ["a@example.com", "b@example.com", "c@example.com"]
    with running(tmp_path, faulty.url) as service:
        code, text = send(service.smtp_port, message(), recipients)
        assert code == 452
        assert "b@example.com (452 4.2.2 mailbox full)" in text and "2 already sent" in text
        faulty.handler.rcpt_replies = {}
        code, text = send(service.smtp_port, message(), recipients)
        assert code == 250 and "3 recipient(s) sent" in text
        assert sorted(e["recipient"] for e in events(service, "email.sent")) == recipients
    assert faulty.handler.copies() == dict.fromkeys(recipients, 1)


def test_a_retry_after_full_delivery_sends_nothing_again(tmp_path: Path, faulty: FaultySink) -> None:
    with running(tmp_path, faulty.url) as service:
        for _ in range(3):  # e.g. the app never saw our 250 and retries
            assert send(service.smtp_port, message(html=False), ["a@example.com", "b@example.com"])[0] == 250
        assert len(events(service, "email.sent")) == 2
    assert faulty.handler.copies() == {"a@example.com": 1, "b@example.com": 1}


def test_without_message_id_each_send_is_a_new_message(tmp_path: Path, faulty: FaultySink) -> None:
    with running(tmp_path, faulty.url) as service:
        for _ in range(2):
            assert send(service.smtp_port, message(message_id=None), ["a@example.com"])[0] == 250
    assert faulty.handler.copies() == {"a@example.com": 2}, "the ledger never swallows a message it cannot identify"


def test_permanent_refusal_of_some_recipients_answers_250_and_records_a_bounce(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
    with running(tmp_path, faulty.url) as service:
        code, text = send(service.smtp_port, message(html=False), ["a@example.com", "gone@example.com"])
        assert code == 250
        assert "1 of 2 recipient(s) sent" in text and "gone@example.com (550 5.1.1 no such user)" in text
        [bounce] = events(service, "email.bounce")
        assert bounce["recipient"] == "gone@example.com" and bounce["reason"] == "550 5.1.1 no such user"
        assert [e["recipient"] for e in events(service, "email.sent")] == ["a@example.com"]
    assert [m.recipients for m in faulty.handler.messages] == [["a@example.com"]], "one transaction, refused one left out"


def test_every_recipient_refused_is_a_5xx_naming_each(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.rcpt_replies = {"x@example.com": "550 5.1.1 no such user", "y@example.com": "553 5.1.3 bad address"}
    with running(tmp_path, faulty.url) as service:
        code, text = send(service.smtp_port, message(), ["x@example.com", "y@example.com"])
        assert code == 554
        assert "x@example.com (550 5.1.1 no such user)" in text and "y@example.com (553 5.1.3 bad address)" in text
        assert len(events(service, "email.bounce")) == 2
    assert faulty.handler.messages == []


def journal_records(directory: Path) -> list[tuple[str, Any]]:
    """(kind, body) of every whole record in the spool's journal files now."""
    records = []
    for path in sorted(directory.glob("*.journal")):
        payloads, _ = read_frames(path.read_bytes())
        records += [tuple(json.loads(payload)) for payload in payloads]
    return records


def test_each_copy_is_ledgered_on_disk_before_the_next_goes_and_a_message_costs_one_fsync(
        tmp_path: Path, faulty: FaultySink, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of a message are appended without waiting and made durable together; a slow disk shows
    that the relay still waits for a copy's ledger row before the upstream can take the next copy (its
    final dot), and for all before the 250, while the next copy's envelope goes during the write."""
    real_write = spool_module._write_and_sync

    def slow_disk(fd: int, data: bytes, offset: int) -> None:
        time.sleep(0.2)
        real_write(fd, data, offset)

    monkeypatch.setattr(spool_module, "_write_and_sync", slow_disk)
    seen: list[list[tuple[str, Any]]] = []  # the journal as each copy's body arrived upstream (its final dot)
    at_envelope: list[list[tuple[str, Any]]] = []  # the journal as each copy's RCPT arrived
    settings = make_settings(tmp_path, faulty.url, upstream={"url": faulty.url})
    handle_data, handle_rcpt = faulty.handler.handle_DATA, faulty.handler.handle_RCPT

    async def journal_at_data(server: Any, session: Any, envelope: Any) -> str:
        seen.append(journal_records(settings.store.spool_path))
        return await handle_data(server, session, envelope)

    async def journal_at_rcpt(server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        at_envelope.append(journal_records(settings.store.spool_path))
        return await handle_rcpt(server, session, envelope, address, options)

    faulty.handler.handle_DATA = journal_at_data  # type: ignore[method-assign]
    faulty.handler.handle_RCPT = journal_at_rcpt  # type: ignore[method-assign]
    recipients = ["a@example.com", "b@example.com", "c@example.com"]
    with RunningService(settings) as service:
        spool = service.service.spool

        async def store_refuses(rows: list[Any]) -> None:
            raise OSError("store away")  # records stay in the journal, where the test reads them

        for kind, handler in list(spool.handlers.items()):
            spool.handlers[kind] = replace(handler, deliver=store_refuses)
        before_tracked = spool.fsyncs
        code, _ = send(service.smtp_port, message(), recipients)
        assert code == 250
        after_tracked = spool.fsyncs
        assert after_tracked - before_tracked == len(recipients), \
            "a tracked message: one fsync per copy (the send rows with the first ledger row), the last with the events"
        code, _ = send(service.smtp_port, message("<m2@app.example>", html=False), recipients)
        assert code == 250
        assert spool.fsyncs - after_tracked == 1, "an untracked message: its ledger rows and events in one fsync"
        kinds = [kind for kind, _ in journal_records(settings.store.spool_path)]
    assert faulty.handler.copies() == dict.fromkeys(recipients, 2)
    for copy in range(len(recipients)):  # copy k's body arrived with the ledger rows of copies 1..k-1 on disk
        ledgered = {r for kind, body in seen[copy] if kind == "ledger" for r in body["recipients"]}
        assert ledgered == set(recipients[:copy]), (copy, seen[copy])
        # The send rows of the copies' tokens, journalled with the first copy's ledger row.
        sent = [fields["recipient"] for kind, body in seen[copy] if kind == "sends" for _, fields in body]
        assert sent == (recipients if copy else []), (copy, seen[copy])
        # Its envelope went while the previous copy's rows were still being written (0.2 s): not waited for.
        ledgered = {r for kind, body in at_envelope[copy] if kind == "ledger" for r in body["recipients"]}
        assert ledgered == set(recipients[:max(copy - 1, 0)]), (copy, at_envelope[copy])
    # Tracked: the send rows with the first ledger row, a ledger row per copy, the events; untracked: one ledger
    # row and the events.
    assert kinds == ["sends", "ledger", "ledger", "ledger", "events", "ledger", "events"]


def test_fallback_carries_the_mail_when_the_primary_is_down(tmp_path: Path, faulty: FaultySink) -> None:
    primary = f"smtp+insecure://127.0.0.1:{free_port()}"
    with running(tmp_path, primary, fallback_urls=[faulty.url]) as service:
        assert send(service.smtp_port, message(), ["a@example.com", "b@example.com"])[0] == 250
    assert faulty.handler.copies() == {"a@example.com": 1, "b@example.com": 1}


def test_a_hung_upstream_releases_the_app_within_the_data_timeout(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.data_delay = 5
    with running(tmp_path, faulty.url, data_timeout_seconds=0.3) as service:
        started = time.monotonic()
        code, text = send(service.smtp_port, message(), ["a@example.com"])
        elapsed = time.monotonic() - started
    assert code == 451 and "connection lost" in text
    assert elapsed < 1.5


def test_send_timeout_bounds_the_whole_transaction_and_keeps_what_went(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.data_delay = 0.35
    recipients = ["a@example.com", "b@example.com", "c@example.com"]
    with running(tmp_path, faulty.url, send_timeout_seconds=0.6) as service:
        started = time.monotonic()
        code, text = send(service.smtp_port, message(), recipients)  # tracked: three copies, 0.35 s each
        elapsed = time.monotonic() - started
        assert code == 451 and "4.4.7" in text and "1 already sent" in text
        assert elapsed < 1.2
        faulty.handler.data_delay = 0
        assert send(service.smtp_port, message(), recipients)[0] == 250
    assert faulty.handler.copies() == dict.fromkeys(recipients, 1)


def test_shutdown_finishes_the_transaction_in_flight_and_closes_idle_sessions(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.stall_rcpt = "a@example.com"
    service = running(tmp_path, faulty.url).__enter__()
    replies: list[tuple[int, str]] = []
    sender = threading.Thread(target=lambda: replies.append(send(service.smtp_port, message(), ["a@example.com"])))
    sender.start()
    idle = smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10)
    idle.ehlo()
    assert faulty.handler.stalled.wait(5), "the message is in flight upstream"
    stopper = threading.Thread(target=service.__exit__, args=(None, None, None))
    stopper.start()
    time.sleep(0.3)
    assert idle.noop()[0] == 421 or not idle.sock, "an idle session is told to go"
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=2)  # no longer accepting
    faulty.handler.release.set()
    sender.join(10)
    stopper.join(10)
    assert replies and replies[0][0] == 250
    assert faulty.handler.copies() == {"a@example.com": 1}


def test_shutdown_cuts_a_transaction_only_after_the_drain_timeout(tmp_path: Path, faulty: FaultySink) -> None:
    faulty.handler.stall_rcpt = "a@example.com"
    settings = make_settings(tmp_path, faulty.url, relay={"drain_timeout_seconds": 0.3})
    service = RunningService(settings).__enter__()
    outcome: list[object] = []

    def app() -> None:
        try:
            outcome.append(send(service.smtp_port, message(), ["a@example.com"]))
        except smtplib.SMTPException as exc:
            outcome.append(exc)

    sender = threading.Thread(target=app)
    sender.start()
    assert faulty.handler.stalled.wait(5)
    started = time.monotonic()
    service.__exit__(None, None, None)
    assert time.monotonic() - started < 2
    sender.join(10)
    assert outcome and (not isinstance(outcome[0], tuple) or outcome[0][0] == 421), "a cut transaction never gets a 250"
    assert faulty.handler.messages == []


def test_ledger_rows_expire_are_purged_and_forgotten(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteEventStore(tmp_path / "ledger.db")
        await store.open()
        now = int(time.time())
        await store.record_delivered([Delivered("p", "m@x", ["A@example.com"], now + 3600), Delivered("p", "m@x", ["b@example.com"], now)])
        assert await store.delivered_recipients("p", "m@x", ["a@example.com", "B@example.com"]) == {"a@example.com"}
        assert await store.delivered_recipients("other", "m@x", ["a@example.com"]) == set()
        assert await store.purge_deliveries() == 1
        assert await store.purge_deliveries() == 0
        await store.forget("a@EXAMPLE.com")  # erasure covers the ledger, which names recipients
        assert await store.delivered_recipients("p", "m@x", ["a@example.com"]) == set()
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("tracking", ["ENABLED", "DISABLED"])
def test_a_large_message_is_prepared_in_the_worker_processes_and_signed_verifiably(
    tmp_path: Path, faulty: FaultySink, tracking: str
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    settings = make_settings(tmp_path, faulty.url,
                             dkim=[{"domain": "example.com", "selector": SELECTOR, "private_key_path": str(tmp_path / "dkim.pem")}],
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": tracking}])
    filler = "".join(f"<p>line {n} of a long newsletter .. with dots</p>\r\n.{n}\r\n" for n in range(12_000))
    html = (f"From: app@example.com\r\nTo: list@example.com\r\nSubject: Big\r\nMessage-ID: <big@app.example>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body>{filler}"
            f'<a href="https://example.com/offer">offer</a></body></html>\r\n').encode()
    assert len(html) > INLINE_BYTES
    with RunningService(settings) as service:
        assert send(service.smtp_port, html, ["a@example.com", "b@example.com"])[0] == 250
        assert service.service._workers is not None and service.service._workers._processes, "the CPU pool did the work"
    records = {f"{SELECTOR}._domainkey.example.com": txt}
    assert len(faulty.handler.messages) == (2 if tracking == "ENABLED" else 1)
    for copy in faulty.handler.messages:
        assert verified(copy.data, records)
        assert (b"/c/" in copy.data) is (tracking == "ENABLED")
