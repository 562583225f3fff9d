"""Fault injection with real sockets: every upstream fault and relay crash, then count lost and duplicated mail.

Each case plays an app that retries on 4xx or a lost connection (as every MTA and mail library
does) against an upstream that fails first and recovers later. A recipient is *lost* when it
ends with no copy although the app was never told it was refused for good; a *duplicate* is any
copy beyond the first. Both must be zero; the totals are printed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import smtplib
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.copies import SCRATCH_PREFIX
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, free_port, make_settings
from tests.processes import Inflight, write_config
from tests.upstreams import FaultySink, RawUpstream, faulty_sink, self_signed_cert

RECIPIENTS = ["a@example.com", "b@example.com", "c@example.com"]
FAST = {"connect_timeout_seconds": 0.5, "command_timeout_seconds": 1.0, "data_timeout_seconds": 1.0}


def message(tag: str, *, tracked: bool = True, attachment: int = 0) -> bytes:
    head = (f"From: app@example.com\r\nTo: team@example.com\r\nSubject: {tag}\r\nMessage-ID: <{tag}@app.example>\r\n"
            f"MIME-Version: 1.0\r\n")
    html = '<html><body><a href="https://example.com/x">x</a></body></html>'
    if not tracked:
        return (head + "X-Inflight-Tracking: off\r\nContent-Type: text/plain\r\n\r\nplain\r\n").encode()
    if not attachment:
        return (head + f"Content-Type: text/html\r\n\r\n{html}\r\n").encode()
    blob = base64.encodebytes(os.urandom(attachment)).replace(b"\n", b"\r\n")
    return (head + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n'
            f"{html}\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ).encode() + blob + b"--b--\r\n"


def attempt(port: int, data: bytes, recipients: list[str]) -> int | None:
    """One app transaction: the DATA reply code, or None when the connection failed."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.login(PROJECT, PROJECT_SECRET)
            client.sendmail("app@example.com", recipients, data)
            return 250
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return min(code for code, _ in exc.recipients.values())
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, ConnectionError, OSError):
        return None


def deliver(port: Callable[[], int], data: bytes, recipients: list[str], heal: Callable[[], None],
            tried: list[int | None] | None = None) -> list[int | None]:
    """The app: try (unless `tried` already), let the fault heal, retry until a final answer (bounded)."""
    codes = tried or [attempt(port(), data, recipients)]
    healed = False
    while (codes[-1] is None or 400 <= codes[-1] < 500) and len(codes) < 6:
        if not healed:
            heal()
            healed = True
        time.sleep(0.05)
        codes.append(attempt(port(), data, recipients))
    return codes


@dataclass
class Tally:
    cases: list[str] = field(default_factory=list)
    lost: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self, case: str, codes: list[int | None], copies: dict[str, int], recipients: list[str],
              refused: Collection[str] = ()) -> None:
        self.cases.append(case)
        lost = [r for r in recipients if r not in refused and copies.get(r, 0) == 0]
        extra = sum(max(0, n - 1) for n in copies.values())
        wrongly_sent = [r for r in refused if copies.get(r, 0)]
        self.lost += len(lost)
        self.duplicates += extra
        final = codes[-1]
        if lost or extra or wrongly_sent or final is None or 400 <= final < 500:
            self.problems.append(f"{case}: replies={codes} copies={copies} lost={lost} refused-but-sent={wrongly_sent}")


@contextlib.contextmanager
def service(tmp_path: Path, url: str, **upstream: object) -> Iterator[RunningService]:
    settings = make_settings(tmp_path, url, upstream={"url": url, **FAST, **upstream})
    with RunningService(settings) as running:
        yield running


def upstream_fault_cases(tmp_path: Path, tally: Tally) -> None:
    """Faults of the upstream, each healed after the app's first try (the relay runs in-process)."""

    def port_fault(case: str, fault: Callable[[int], contextlib.AbstractContextManager[object]], tracked: bool) -> None:
        port = free_port()
        with contextlib.ExitStack() as stack, service(tmp_path / case, f"smtp+insecure://127.0.0.1:{port}") as relay:
            stack.enter_context(fault(port))
            sinks: list[FaultySink] = []

            def heal() -> None:
                stack.close()  # the faulty listener goes; a healthy upstream takes the same port
                sinks.append(stack.enter_context(faulty_sink(port=port)))

            codes = deliver(lambda: relay.smtp_port, message(case, tracked=tracked), RECIPIENTS, heal)
            tally.check(case, codes, sinks[0].handler.copies() if sinks else {}, RECIPIENTS)

    port_fault("connection refused", lambda port: contextlib.nullcontext(), tracked=True)
    port_fault("silent greeting (connect timeout)", lambda port: _raw("silent", port), tracked=True)
    port_fault("421 greeting", lambda port: _raw("421", port), tracked=False)
    port_fault("dropped mid-body", lambda port: _raw("drop-mid-data", port), tracked=True)

    def flag_fault(case: str, tracked: bool, set_fault: Callable[[FaultySink], None], refused: Collection[str] = ()) -> None:
        with faulty_sink() as sink, service(tmp_path / case, sink.url) as relay:
            set_fault(sink)
            permanent = {r: reply for r, reply in sink.handler.rcpt_replies.items() if reply.startswith("5")}

            def heal() -> None:  # temporary faults clear; a refused mailbox stays refused
                handler = sink.handler
                handler.data_reply, handler.data_delay, handler.drop_after_data = None, 0.0, False
                handler.rcpt_replies = permanent

            codes = deliver(lambda: relay.smtp_port, message(case, tracked=tracked), RECIPIENTS, heal)
            tally.check(case, codes, sink.handler.copies(), RECIPIENTS, refused)

    flag_fault("dropped after body, before reply", True, lambda s: setattr(s.handler, "drop_after_data", True))
    flag_fault("451 on DATA", False, lambda s: setattr(s.handler, "data_reply", "451 4.3.0 try later"))
    flag_fault("451 on DATA, tracked copies", True, lambda s: setattr(s.handler, "data_reply", "451 4.3.0 try later"))
    flag_fault("550 on DATA", False, lambda s: setattr(s.handler, "data_reply", "550 5.7.1 rejected"), set(RECIPIENTS))
    flag_fault("hung DATA reply (data timeout)", True, lambda s: setattr(s.handler, "data_delay", 5.0))
    flag_fault("partial RCPT 452, one transaction", False,
               lambda s: setattr(s.handler, "rcpt_replies", {"b@example.com": "452 4.2.2 mailbox full"}))
    flag_fault("partial RCPT 452, tracked copies", True,
               lambda s: setattr(s.handler, "rcpt_replies", {"b@example.com": "452 4.2.2 mailbox full"}))
    flag_fault("partial RCPT 550, one transaction", False,
               lambda s: setattr(s.handler, "rcpt_replies", {"c@example.com": "550 5.1.1 unknown"}), {"c@example.com"})
    flag_fault("partial RCPT 550 + 452, tracked copies", True,
               lambda s: setattr(s.handler, "rcpt_replies", {"b@example.com": "452 4.2.2 full", "c@example.com": "550 5.1.1 no"}),
               {"c@example.com"})

    # Faults that a fallback upstream absorbs on the first try.
    def with_fallback(case: str, primary: contextlib.AbstractContextManager[str], scheme: str = "smtp+insecure") -> None:
        with primary as primary_port, faulty_sink() as sink, service(
            tmp_path / case, f"{scheme}://127.0.0.1:{primary_port}", fallback_urls=[sink.url]
        ) as relay:
            codes = deliver(lambda: relay.smtp_port, message(case), RECIPIENTS, lambda: None)
            tally.check(case, codes, sink.handler.copies(), RECIPIENTS)

    with_fallback("refused primary, fallback", contextlib.nullcontext(str(free_port())))
    with_fallback("silent primary, fallback", _raw_port("silent"))
    with_fallback("bad TLS certificate on primary, fallback", _tls_sink_port(tmp_path), scheme="smtp")


@contextlib.contextmanager
def _raw(mode: str, port: int) -> Iterator[RawUpstream]:
    raw = RawUpstream(mode)
    raw.port = port
    with raw:
        yield raw


@contextlib.contextmanager
def _raw_port(mode: str) -> Iterator[str]:
    with RawUpstream(mode) as raw:
        yield str(raw.port)


@contextlib.contextmanager
def _tls_sink_port(tmp_path: Path) -> Iterator[str]:
    with faulty_sink(self_signed_cert(tmp_path)) as sink:
        yield str(sink.port)


class RelayProcess(Inflight):
    """`inflight relay` as a real process on a port of its own (the same across restarts), so it can be killed like one."""

    def __init__(self, tmp_path: Path, upstream_url: str) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        super().__init__("relay", tmp_path / "relay.toml", tmp_path / "relay.log")
        self.smtp_port = free_port()
        write_config(self.config, upstream_url, relay={"listen": f"127.0.0.1:{self.smtp_port}", "drain_timeout_seconds": 5},
                     upstream={"connect_timeout_seconds": 1, "data_timeout_seconds": 10})

    def descendants(self) -> set[int]:
        assert self.process is not None
        found, frontier = set(), {self.process.pid}
        while frontier:
            parent = frontier.pop()
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                        child = int(stat.parent.name)
                        found.add(child)
                        frontier.add(child)
        return found

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


def crash_cases(tmp_path: Path, tally: Tally) -> None:
    """The relay killed with SIGKILL mid-transaction, restarted, and the app retrying."""

    def crash(case: str, data: bytes, recipients: list[str], arm: Callable[[FaultySink], None],
              wait_for: Callable[[FaultySink, RelayProcess], None], raw_upload: bool = False) -> set[int]:
        with faulty_sink() as sink:
            relay = RelayProcess(tmp_path / case.replace(" ", "-"), sink.url).start()
            try:
                arm(sink)
                first: list[int | None] = []
                app = threading.Thread(target=lambda: first.append(
                    _partial_upload(relay.port, data, recipients) if raw_upload else attempt(relay.port, data, recipients)))
                app.start()
                wait_for(sink, relay)
                children = relay.descendants()
                assert relay.process is not None
                killed = children | {relay.process.pid}
                relay.signal(signal.SIGKILL)
                relay.wait(10)
                app.join(20)
                sink.handler.release.set()
                sink.handler.data_delay = 0
                relay.start()
                left = [p for pid in killed for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{pid}-*")]
                if left:  # the killed processes' messages and copies: removed by the relay that started next
                    tally.problems.append(f"{case}: scratch directories of the killed relay left: {left}")
                assert first, "the app's first attempt ended"
                codes = deliver(lambda: relay.port, data, recipients, lambda: None, tried=first)
                tally.check(case, codes, sink.handler.copies(), recipients)
                return children
            finally:
                relay.kill()

    def stall_rcpt(sink: FaultySink) -> None:
        sink.handler.stall_rcpt = "b@example.com"

    def stalled(sink: FaultySink, relay: RelayProcess) -> None:
        assert sink.handler.stalled.wait(20), relay.log.read_text()

    def delay_data(sink: FaultySink) -> None:
        sink.handler.data_delay = 30

    def data_started(sink: FaultySink, relay: RelayProcess) -> None:
        assert sink.handler.data_started.wait(20), relay.log.read_text()

    big = message("crash-mid-copies", attachment=300_000)  # large enough for the CPU pool: its workers must die too
    children = crash("SIGKILL between tracked copies", big, RECIPIENTS, stall_rcpt, stalled)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    if orphans:
        tally.problems.append(f"worker processes outlived the killed relay: {orphans}")
    crash("SIGKILL while upstream holds DATA", message("crash-data", tracked=False), RECIPIENTS[:2], delay_data, data_started)
    crash("SIGKILL during the app's upload", message("crash-upload", attachment=200_000), RECIPIENTS[:1],
          lambda sink: None, lambda sink, relay: time.sleep(0.5), raw_upload=True)


def _partial_upload(port: int, data: bytes, recipients: list[str]) -> int | None:
    """An app whose connection dies half-way through DATA: it sends half the body, then waits."""
    with contextlib.suppress(OSError, smtplib.SMTPException), smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.mail("app@example.com")
        for recipient in recipients:
            client.rcpt(recipient)
        client.putcmd("data")
        client.getreply()
        assert client.sock is not None
        client.sock.sendall(data[: len(data) // 2])
        client.getreply()  # blocks until the relay dies
    return None


def shutdown_case(tmp_path: Path, tally: Tally) -> None:
    """SIGTERM while a message is with the upstream: it finishes with its 250, then the relay exits."""
    with faulty_sink() as sink:
        relay = RelayProcess(tmp_path / "sigterm", sink.url).start()
        try:
            sink.handler.stall_rcpt = "a@example.com"
            codes: list[int | None] = []
            app = threading.Thread(target=lambda: codes.append(attempt(relay.port, message("sigterm"), RECIPIENTS[:1])))
            app.start()
            assert sink.handler.stalled.wait(20)
            idle = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
            idle.ehlo()
            relay.signal(signal.SIGTERM)
            time.sleep(0.3)
            refused_new = attempt(relay.port, message("after-sigterm"), RECIPIENTS[1:2]) is None
            try:
                idle_told = idle.noop()[0] == 421
            except smtplib.SMTPServerDisconnected:
                idle_told = True
            if not idle_told:
                tally.problems.append("SIGTERM: an idle session was neither told 421 nor closed")
            sink.handler.release.set()
            app.join(20)
            exit_code = relay.wait(10)
            tally.check("SIGTERM with a message in flight", codes, sink.handler.copies(), RECIPIENTS[:1])
            if codes != [250] or exit_code != 0 or not refused_new:
                tally.problems.append(f"SIGTERM: replies={codes} exit={exit_code} new connections refused={refused_new}")
        finally:
            relay.kill()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts child processes through /proc (Linux)")
def test_fault_injection_loses_nothing_and_duplicates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tally = Tally()
    upstream_fault_cases(tmp_path, tally)
    crash_cases(tmp_path, tally)
    shutdown_case(tmp_path, tally)
    with capsys.disabled():
        print(f"\nfault injection: cases tried={len(tally.cases)}, messages lost={tally.lost}, duplicates={tally.duplicates}")
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.lost == 0 and tally.duplicates == 0
