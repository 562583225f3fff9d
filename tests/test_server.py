"""The SMTP listener over real sockets: TLS (STARTTLS and implicit), require_tls, AUTH back-off,
per-project sender domains, recipient limits and rates, and the Received trace field."""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.server import RelayHandler, RelaySMTP
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, TlsFiles, make_settings


def message(sender: str = "app@example.com", to: str = "a@example.com", extra: str = "", message_id: str = "m1@app.example") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: hello\r\nMessage-ID: <{message_id}>\r\n{extra}"
            "\r\nplain body\r\n").encode()


def tls_settings(tmp_path: Path, sink: Sink, tls: TlsFiles, **relay: Any) -> Any:
    return make_settings(tmp_path, sink.url, relay={
        "tls_cert": str(tls.cert), "tls_key": str(tls.key), "allow_plaintext_auth": False,
        "smtps_listen": "127.0.0.1:0", **relay})


@pytest.fixture
def tls_service(tmp_path: Path, sink: Sink, tls_files: TlsFiles) -> Iterator[RunningService]:
    with RunningService(tls_settings(tmp_path, sink, tls_files)) as running:
        yield running


def test_starttls_then_auth_and_send(tls_service: RunningService, sink: Sink, tls_files: TlsFiles) -> None:
    with smtplib.SMTP("127.0.0.1", tls_service.smtp_port, timeout=10) as client:
        client.ehlo("app.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")  # no AUTH offered in the clear
        client.starttls(context=tls_files.client_context())
        client.ehlo("app.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.login(PROJECT, PROJECT_SECRET)
        client.sendmail("app@example.com", ["a@example.com"], message())
    [delivered] = sink.messages
    first = delivered.data.split(b"\r\n\t")[0]
    assert first == b"Received: from app.test ([127.0.0.1])"
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)\r\n\tby relay\.test \(inflight\) "
                     rb"with ESMTPSA\r\n\tfor <a@example\.com>; \w{3}, ", delivered.data)
    assert delivered.data.endswith(message())  # everything below the trace field is as sent


def test_implicit_tls_listener_offers_and_accepts_auth(tls_service: RunningService, sink: Sink, tls_files: TlsFiles) -> None:
    # aiosmtpd alone hides AUTH here and answers 538 (its issues #281/#274).
    with smtplib.SMTP_SSL("127.0.0.1", tls_service.smtps_port, timeout=10, context=tls_files.client_context()) as client:
        client.ehlo("app.test")
        assert "PLAIN" in client.esmtp_features["auth"] and not client.has_extn("starttls")
        client.login(PROJECT, PROJECT_SECRET)
        client.sendmail("app@example.com", ["a@example.com", "b@example.com"], message())
    [delivered] = sink.messages
    assert b"with ESMTPSA" in delivered.data and b"(using TLSv1." in delivered.data
    assert b"for <" not in delivered.data.split(b"\r\n\r\n")[0]  # two recipients: none is named


def test_implicit_tls_listener_survives_a_client_that_does_not_speak_tls(tls_service: RunningService, sink: Sink,
                                                                         tls_files: TlsFiles) -> None:
    with socket.create_connection(("127.0.0.1", tls_service.smtps_port), timeout=5) as plain:
        plain.sendall(b"EHLO plain.client\r\n")
        answer = plain.recv(1024)
        assert not answer.startswith(b"2")  # a TLS alert or a closed connection, never an SMTP greeting
    with smtplib.SMTP_SSL("127.0.0.1", tls_service.smtps_port, timeout=10, context=tls_files.client_context()) as client:
        client.login(PROJECT, PROJECT_SECRET)


def test_require_tls_refuses_mail_before_starttls(tmp_path: Path, sink: Sink, tls_files: TlsFiles) -> None:
    settings = tls_settings(tmp_path, sink, tls_files, require_tls=True)
    with RunningService(settings) as service, smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.ehlo()
        code, text = client.mail("app@example.com")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert client.docmd("AUTH", "PLAIN AGRlbW8AZGVtby1zZWNyZXQ=")[0] == 538
        client.starttls(context=tls_files.client_context())
        client.login(PROJECT, PROJECT_SECRET)
        client.sendmail("app@example.com", ["a@example.com"], message())
    assert len(sink.messages) == 1


def plain_login(port: int, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN attempt (smtplib's login() would go on to try LOGIN as a second attempt)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.user, client.password = user, password
        try:
            return client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error


def test_auth_failures_from_one_address_are_throttled_and_logged(tmp_path: Path, sink: Sink,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, sink.url, relay={"auth_failures_per_ip": 3, "auth_backoff_seconds": 60})
    caplog.set_level(logging.INFO)
    with RunningService(settings) as service:
        codes = [plain_login(service.smtp_port, PROJECT, f"guess-{n}-password")[0] for n in range(3)]
        assert codes == [535, 535, 535]
        # Now refused before the password is looked at, even the right one.
        assert plain_login(service.smtp_port, PROJECT, PROJECT_SECRET) == (454, b"4.7.0 Too many failed authentication "
                                                                                 b"attempts, try again later")
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth-failed")]
    assert len(failed) == 3 and "peer=127.0.0.1 user=demo" in failed[0] and "failures_ip=3" in failed[2]
    assert any(r.getMessage().startswith("auth-throttled peer=127.0.0.1 user=demo") for r in caplog.records)
    assert not any("guess-" in r.getMessage() for r in caplog.records)


def test_unknown_usernames_are_logged_by_hash_not_by_text(tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with RunningService(make_settings(tmp_path, sink.url)) as service:
        # An operator who swapped the fields: the secret went into the username.
        assert plain_login(service.smtp_port, PROJECT_SECRET, PROJECT)[0] == 535
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth-failed")]
    assert re.search(r"user=unknown:[0-9a-f]{12} ", line) and PROJECT_SECRET not in line


def test_sender_domains_are_enforced_on_mail_from_and_from_header(tmp_path: Path, sink: Sink) -> None:
    project = {"id": PROJECT, "secret": PROJECT_SECRET, "sender_domains": ["example.com"]}
    with RunningService(make_settings(tmp_path, sink.url, projects=[project])) as service, \
            smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        assert client.mail("app@evil.example") == (550, b"5.7.1 Sender domain not allowed for this project (sender_domains)")
        assert client.mail("app@sub.example.com")[0] == 550  # a subdomain is another domain
        client.rset()
        for sender in ("app@evil.example", '"app@example.com" <app@evil.example>', "app@example.com, x@evil.example"):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("app@EXAMPLE.com", ["a@example.com"], message(sender=sender))
            assert refused.value.smtp_code == 550 and b"From header" in refused.value.smtp_error
        client.sendmail("app@EXAMPLE.com", ["a@example.com"], message(sender="App <app@example.com>"))
    assert len(sink.messages) == 1


def test_project_max_recipients_overrides_the_relay_limit(tmp_path: Path, sink: Sink) -> None:
    project = {"id": PROJECT, "secret": PROJECT_SECRET, "max_recipients": 1}
    with RunningService(make_settings(tmp_path, sink.url, projects=[project])) as service, \
            smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        refused = client.sendmail("app@example.com", ["a@example.com", "b@example.com"], message())
    assert refused == {"b@example.com": (452, b"4.5.3 Too many recipients")}
    assert [m.recipients for m in sink.messages] == [["a@example.com"]]


def test_project_rate_limit_answers_451_and_sends_nothing_more(tmp_path: Path, sink: Sink) -> None:
    project = {"id": PROJECT, "secret": PROJECT_SECRET, "rate_limit_per_minute": 2, "tracking": "DISABLED"}
    with RunningService(make_settings(tmp_path, sink.url, projects=[project])) as service, \
            smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.sendmail("app@example.com", ["a@example.com"], message())
        # another message: a repeated Message-ID to the same recipient is a retry, and goes once
        client.sendmail("app@example.com", ["a@example.com"], message(message_id="m2@app.example"))
        code, text = client.mail("app@example.com")
        assert code == 451 and text.startswith(b"4.7.1 Sending rate limit of this project exceeded, try again in ")
    assert len(sink.messages) == 2



_PATH_PIECES = ["a", "Zz9", ".", "..", "-", "_", "+", "!", "'", '"', " ", "\t", "(c)", "[1.2.3.4]", "[", "\\", "é", ",", ":",
                "@"]


def _outcome(read: Any, arg: str) -> object:
    """What reading `arg` gives, or the exception it raises (aiosmtpd's parser raises on some paths)."""
    try:
        return read(arg)
    except Exception as exc:
        return type(exc)


@settings(max_examples=2000, deadline=None)
@given(local=st.lists(st.sampled_from(_PATH_PIECES), max_size=5), domain=st.lists(st.sampled_from(_PATH_PIECES), max_size=5),
       before=st.sampled_from(["", " "]),
       after=st.lists(st.sampled_from([" ", "\t", "SIZE=1000", "BODY=8BITMIME", "(comment)", ">", "<", "x"]), max_size=3),
       limit=st.sampled_from([0, 3, 64]))
def test_mail_and_rcpt_paths_are_read_as_aiosmtpd_reads_them(local: list[str], domain: list[str], before: str,
                                                             after: list[str], limit: int) -> None:
    """The relay's fast path for plain `<local@domain>` paths answers exactly as aiosmtpd's parser."""
    arg = f"{before}<{''.join(local)}@{''.join(domain)}>{''.join(after)}"
    server = RelaySMTP.__new__(RelaySMTP)
    server.local_part_limit = limit
    assert _outcome(server._getaddr, arg) == _outcome(lambda path: SMTP._getaddr(server, path), arg)
    server.local_part_limit = 0
    assert server._getaddr("<user.name+tag@mail.example.com> SIZE=1000") == ("user.name+tag@mail.example.com", "SIZE=1000")


def test_aiosmtpd_finds_every_command_auth_method_and_hook_through_the_narrowed_dir() -> None:
    """RelaySMTP and RelayHandler list only their commands, AUTH methods and hooks to dir() (aiosmtpd's
    per-connection lookup): it must still find every one the classes have."""
    handler = RelayHandler.__new__(RelayHandler)  # the lookups read methods, not state
    loop = asyncio.new_event_loop()
    try:
        server = RelaySMTP(handler, require_tls=False, auth_required=True, auth_require_tls=False, loop=loop)
    finally:
        loop.close()
    every = {name for cls in RelaySMTP.__mro__ for name in vars(cls)}
    assert set(server._smtp_methods) == {n.removeprefix("smtp_") for n in every if n.startswith("smtp_")}
    assert set(server._auth_methods) == {"LOGIN", "PLAIN"}
    hooks = {name for cls in RelayHandler.__mro__ for name in vars(cls) if name.startswith("handle_")}
    assert set(server._handle_hooks) == {n.removeprefix("handle_") for n in hooks} and len(hooks) >= 4
