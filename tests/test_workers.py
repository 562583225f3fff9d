"""Process lifecycle as an operator meets it: real `inflight` processes, sockets, a SQLite file.

A second instance on busy ports leaves the first alone; `workers = 2` runs two processes that
both serve, drain on SIGTERM and are restarted when one dies.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from inflight.service import ListenError, Listeners
from inflight.supervisor import Slot, plan_slots
from tests.conftest import PROJECT, PROJECT_SECRET, Sink, free_port, make_settings
from tests.processes import Inflight, answers, write_config
from tests.test_flow import html_message, html_of


class Serve(Inflight):
    """`inflight serve` (or another verb) on free ports, its log in a file; a context manager: up
    (its /healthz answers) on entry, SIGTERM on exit."""

    def __init__(self, tmp_path: Path, sink: Sink, *, workers: int, verb: str = "serve",
                 smtp_port: int | None = None, http_port: int | None = None, name: str = "first",
                 store_url: str | None = None) -> None:
        super().__init__(verb, tmp_path / f"{name}.toml", tmp_path / f"{name}.log")
        self.smtp_port = smtp_port or free_port()
        self.http_port = http_port or free_port()
        write_config(self.config, sink.url,
                     relay={"listen": f"127.0.0.1:{self.smtp_port}", "workers": workers, "cpu_workers": 1,
                            "drain_timeout_seconds": 10},
                     tracker={"listen": f"127.0.0.1:{self.http_port}", "public_url": self.http_base, "workers": workers},
                     store={"url": store_url or f"sqlite:///{tmp_path}/inflight.db"})

    def __enter__(self) -> Serve:
        return self.start(ready=lambda serve: answers(f"{serve.http_base}/healthz"))

    def __exit__(self, *exc: object) -> None:
        self.stop(30)

    def send(self, subject: str) -> None:
        message = html_message({"X-Inflight-Template-Type": "MARKETING"})
        message.replace_header("Subject", subject)
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.login(PROJECT, PROJECT_SECRET)
            client.send_message(message)

    def events(self) -> list[dict]:
        response = httpx.get(f"http://127.0.0.1:{self.http_port}/v1/events", params={"limit": "500"},
                             headers={"Authorization": f"Bearer {PROJECT_SECRET}"}, timeout=10)
        assert response.status_code == 200, response.text
        return list(response.json()["events"])


def serving_pid(client: socket.socket, candidates: set[int]) -> int | None:
    """The process holding the server side of `client`'s connection (from /proc: socket inode → fd)."""
    local, remote = client.getsockname()[1], client.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == remote and int(fields[2].split(":")[1], 16) == local:
            inode = fields[9]
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def test_slots_give_each_worker_its_roles(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "outbox:///x", relay={"workers": 3}, tracker={"workers": 1})
    assert plan_slots(settings, relay=True, tracker=True) == [Slot(0, True, True), Slot(1, True, False), Slot(2, True, False)]
    assert plan_slots(settings, relay=False, tracker=True) == [Slot(0, False, True)]


def test_binding_stops_at_a_busy_address_and_keeps_nothing_open(tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    free, taken = free_port(), busy.getsockname()[1]
    settings = make_settings(tmp_path, "outbox:///x", relay={"listen": f"127.0.0.1:{free}"},
                             tracker={"listen": f"127.0.0.1:{taken}"})
    with busy, pytest.raises(ListenError) as refused:
        Listeners.bind(settings, relay=True, tracker=True)
    assert str(refused.value) == f"address in use: 127.0.0.1:{taken} (tracker.listen)"
    socket.create_server(("127.0.0.1", free)).close()  # the relay socket bound before it was released


def test_a_second_serve_on_busy_ports_exits_1_and_the_first_keeps_working(tmp_path: Path, sink: Sink) -> None:
    with Serve(tmp_path, sink, workers=1) as first:
        sent: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                try:
                    first.send(f"m{len(sent)}")
                    sent.append(f"m{len(sent)}")
                except BaseException as exc:  # reported below
                    failures.append(exc)
                    return

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            for verb in ("serve", "relay", "tracker"):
                second = Serve(tmp_path, sink, workers=1, verb=verb, smtp_port=first.smtp_port, http_port=first.http_port,
                               name=f"second-{verb}")
                started = time.monotonic()
                done = second.run()
                assert done.returncode == 1, done.stderr
                key = "tracker.listen" if verb == "tracker" else "relay.listen"
                port = first.http_port if verb == "tracker" else first.smtp_port
                assert done.stderr.splitlines()[-1] == f"address in use: 127.0.0.1:{port} ({key})"
                assert "Traceback" not in done.stderr and time.monotonic() - started < 20
                assert httpx.get(f"http://127.0.0.1:{first.http_port}/healthz").json()["store"] == "ok"
        finally:
            stop.set()
            sender.join(60)
        assert not failures, failures
        assert len(sent) >= 1 and len(sink.messages) == len(sent)
        pixel = re.search(r'src="(http://[^"]+/o/[^"]+)"', html_of(sink.messages[-1].data)).group(1)  # type: ignore[union-attr]
        assert httpx.get(pixel).status_code == 200
        names = [e["name"] for e in first.events()]
        assert names.count("email.sent") == len(sent) and names.count("email.open") == 1
    log = first.log.read_text()
    assert "-failed" not in log and "Traceback" not in log, log


def test_two_workers_both_serve_and_both_drain_on_sigterm(tmp_path: Path, sink: Sink, store_url: str) -> None:
    """On SQLite (two processes on one WAL file) and on PostgreSQL alike."""
    with Serve(tmp_path, sink, workers=2, store_url=store_url) as serve:
        workers = serve.workers()
        assert len(workers) == 2
        served: dict[int, smtplib.SMTP] = {}
        clients = []
        deadline = time.monotonic() + 20
        while len(served) < 2:  # connections until both workers hold one, each then mid-transaction
            assert time.monotonic() < deadline, f"only {set(served)} of {workers} served"
            client = smtplib.SMTP("127.0.0.1", serve.smtp_port, timeout=30)
            clients.append(client)
            pid = serving_pid(client.sock, workers)
            assert pid in workers
            if pid not in served:
                client.login(PROJECT, PROJECT_SECRET)
                client.mail("app@example.com")
                client.rcpt(f"{pid}@example.com")
                served[pid] = client
        http_pids: set[int | None] = set()
        held = []
        while len(http_pids) < 2:  # keep-alive connections until both tracker workers answered one
            assert time.monotonic() < deadline, f"only {http_pids} of {workers} answered HTTP"
            connection = socket.create_connection(("127.0.0.1", serve.http_port), timeout=10)
            held.append(connection)
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            http_pids.add(serving_pid(connection, workers))
        assert http_pids == workers
        for connection in held:
            connection.close()

        assert serve.process is not None
        serve.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # both workers are draining: their transactions may still finish
        for pid, client in served.items():
            code, _ = client.data(b"Subject: drained\r\n\r\nhello\r\n")
            assert code == 250, pid
        assert serve.process.wait(30) == 0
        for client in clients:
            client.close()
    assert sorted(m.recipients[0] for m in sink.messages) == sorted(f"{pid}@example.com" for pid in served)
    with Serve(tmp_path, sink, workers=1, store_url=store_url, name="after") as after:  # both recorded their email.sent
        assert sorted(e["recipient"] for e in after.events() if e["name"] == "email.sent") == \
            sorted(f"{pid}@example.com" for pid in served)
    log = serve.log.read_text()
    assert all(f"worker-stopped slot={slot} pid=" in log for slot in (0, 1)), log


def test_a_killed_worker_is_restarted_and_serves(tmp_path: Path, sink: Sink) -> None:
    with Serve(tmp_path, sink, workers=2) as serve:
        before = serve.workers()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(serve.workers() - {victim}) < 2:
            assert time.monotonic() < deadline, serve.log.read_text()
            time.sleep(0.1)
        for index in range(4):
            serve.send(f"after-{index}")
        assert len(sink.messages) == 4
        assert "worker-exited slot=" in serve.log.read_text()
