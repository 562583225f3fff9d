"""Metrics, health and logs as an operator meets them: real listeners, real scrapes, real log output."""

from __future__ import annotations

import json
import logging
import os
import re
import smtplib
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from monitoring.logs import JsonFormatter
from store.sqlite import sqlite_path
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, free_port, make_settings
from tests.processes import ROOT, Inflight, answers, wait_for, write_config
from tests.test_flow import fetch, html_message, send, tracked_urls


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_json_log_lines_lift_the_event_and_its_fields() -> None:
    record = logging.LogRecord("inflight.relay", logging.INFO, __file__, 1,
                               "outcome=%s project=%s recipients=%d detail=%r", ("queued", "demo", 2, "250 2.0.0 OK: a b"), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "inflight.relay"
    assert entry["outcome"] == "queued" and entry["project"] == "demo" and entry["recipients"] == "2"
    assert entry["detail"] == "250 2.0.0 OK: a b" and entry["message"].startswith("outcome=queued")
    record = logging.LogRecord("inflight.relay", logging.WARNING, __file__, 1, "auth-failed peer=%s", ("1.2.3.4",), None)
    assert json.loads(JsonFormatter().format(record))["event"] == "auth-failed"


def test_relay_http_listener_serves_metrics_and_health(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, relay={"http_listen": "127.0.0.1:0"})
    with RunningService(settings) as running:
        address = running.service.relay_http_address
        assert address is not None
        base = f"http://127.0.0.1:{address[1]}"
        before = httpx.get(f"{base}/metrics").text
        send(running.smtp_port, html_message({"X-Inflight-Template-Type": "MARKETING"}))
        send(running.smtp_port, html_message({"X-Inflight-Tracking": "off"}))
        after = httpx.get(f"{base}/metrics")
        assert httpx.get(f"{base}/healthz").json() == {"ok": True, "store": "ok"}
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for labels, added in (({"project": PROJECT, "outcome": "queued"}, 2),):
        assert sample(text, "inflight_messages_total", **labels) - sample(before, "inflight_messages_total", **labels) == added
    for tracked in ("true", "false"):
        labels = {"project": PROJECT, "tracked": tracked}
        assert sample(text, "inflight_messages_tracked_total", **labels) - sample(before, "inflight_messages_tracked_total", **labels) == 1
    assert sample(text, "inflight_upstream_seconds_count", upstream="127.0.0.1") >= 2
    assert sample(text, "inflight_upstream_pool_connections", upstream="127.0.0.1", state="idle") >= 1
    assert sample(text, "inflight_store_seconds_count", operation="record") >= 2


def test_tracker_metrics_count_hits_by_kind_and_agent_and_only_for_allowed_readers(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, webhooks={"poll_seconds": 0.05},
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "webhook_url": f"http://127.0.0.1:{free_port()}/h",
                                        "webhook_secret": "0123456789abcdef"}])
    with RunningService(settings) as running:
        before = httpx.get(f"{running.http_base}/metrics").text
        send(running.smtp_port, html_message({"X-Inflight-Template-Type": "MARKETING"}))
        pixel = next(u for u in tracked_urls(sink.messages[0].data) if "/o/" in u)
        assert fetch(running, pixel, headers={"User-Agent": "curl/8.0"}).status_code == 200

        def counted(text: str) -> float:  # a hit is counted when its spool delivers it, moments after the answer
            return sample(text, "inflight_tracker_hits_total", kind="open", agent="scanner") - \
                sample(before, "inflight_tracker_hits_total", kind="open", agent="scanner")

        text = poll_metrics(running.http_base, lambda text: counted(text) >= 1)
    assert counted(text) == 1
    assert sample(text, "inflight_store_seconds_count", operation="record_engagement") >= 1
    assert sample(text, "inflight_webhook_backlog") >= 1  # the receiver is down: sent and open wait
    assert sample(text, "inflight_webhook_oldest_seconds") >= 0

    closed = make_settings(tmp_path, sink.url, tracker={"metrics_allow": ["10.0.0.0/8"]})
    with RunningService(closed) as running:
        assert httpx.get(f"{running.http_base}/metrics").status_code == 404


def test_upstream_failure_names_cause_and_host_never_the_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = make_settings(tmp_path, f"smtp+insecure://user:hunter2pass@127.0.0.1:{port}", relay={"http_listen": "127.0.0.1:0"})
    with caplog.at_level(logging.INFO), RunningService(settings) as running:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            send(running.smtp_port, html_message())
        address = running.service.relay_http_address
        assert address is not None
        text = httpx.get(f"http://127.0.0.1:{address[1]}/metrics").text
    reply = deferred.value.smtp_error.decode()
    assert deferred.value.smtp_code == 451
    assert reply.startswith(f"4.4.1 Upstream unavailable: refused at 127.0.0.1:{port}")
    assert f"refused at 127.0.0.1:{port}" in caplog.text
    assert "hunter2pass" not in caplog.text + reply
    assert sample(text, "inflight_upstream_failures_total", upstream="127.0.0.1", cause="refused") >= 1


def raw_session(port: int, commands: bytes, replies: int) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(commands)
        answers = []
        while len(answers) < replies:
            line = stream.readline().decode().strip()
            if line[3:4] != "-":  # the last line of a (multi-line) reply
                answers.append(line)
        return answers


AUTH = b"EHLO app.test\r\nAUTH PLAIN AGRlbW8AZGVtby1zZWNyZXQ=\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"


def test_aiosmtpds_own_refusals_say_why_and_are_logged(tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, sink.url, relay={"max_message_bytes": 5000})
    with caplog.at_level(logging.INFO), RunningService(settings) as running:
        big = raw_session(running.smtp_port, AUTH + (b"x" * 900 + b"\r\n") * 8 + b".\r\n", 6)
        bare_lf = raw_session(running.smtp_port, AUTH + b"Subject: x\n\n" + b"line\n" * 300 + b"\r\n.\r\n", 6)
        long_line = raw_session(running.smtp_port, AUTH + b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n", 6)
        no_auth = raw_session(running.smtp_port, b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n", 2)
    assert big[-1] == "552 5.3.4 Message too big: the limit is 5000 bytes (relay.max_message_bytes)"
    assert bare_lf[-1].startswith("500 5.6.0 Line too long: bare LF or line over 998 characters")
    assert long_line[-1].startswith("500 5.6.0 Line too long: a line is over 998 characters")
    assert no_auth[-1].startswith("530")
    for reply in (big[-1], bare_lf[-1], long_line[-1], no_auth[-1]):
        assert f"smtp-refused peer=127.0.0.1 user={'None' if reply.startswith('530') else PROJECT} reply={reply!r}" in caplog.text
    assert sink.messages == []


def test_processes_share_metrics_and_log_json_with_one_auth_warning(tmp_path: Path, sink: Sink) -> None:
    """`inflight relay` and `inflight tracker` as processes with PROMETHEUS_MULTIPROC_DIR: either /metrics
    answers for both. The relay logs JSON, and warns about AUTH without TLS once, not per connection."""
    smtp_port, relay_http, tracker_http = free_port(), free_port(), free_port()
    cores = os.cpu_count() or 1  # the default number of workers: metrics of several processes per node
    config = write_config(tmp_path / "inflight.toml", sink.url,
                          relay={"listen": f"127.0.0.1:{smtp_port}", "http_listen": f"127.0.0.1:{relay_http}", "workers": cores},
                          tracker={"listen": f"127.0.0.1:{tracker_http}", "secrets": ["multiprocess-secret"], "workers": cores},
                          log={"format": "json", "access_log": True})
    (tmp_path / "prom").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    relay = Inflight("relay", config, tmp_path / "relay.log", env=env)
    tracker = Inflight("tracker", config, tmp_path / "tracker.log", env=env)
    try:
        relay.start(ready=lambda _: answers(f"http://127.0.0.1:{relay_http}/healthz"))
        tracker.start(ready=lambda _: answers(f"http://127.0.0.1:{tracker_http}/healthz"))
        for _ in range(3):
            send(smtp_port, html_message({"X-Inflight-Template-Type": "MARKETING"}))
        pixel = next(u for u in tracked_urls(sink.messages[0].data) if "/o/" in u).replace("http://127.0.0.1:1", "")
        assert httpx.get(f"http://127.0.0.1:{tracker_http}{pixel}").status_code == 200
        # the hit is counted once stored: its spool delivers it just after the answer
        text = poll_metrics(f"http://127.0.0.1:{relay_http}", lambda text: sample(text, "inflight_tracker_hits_total", kind="open") == 1,
                            seconds=10, every=0.1)
    finally:
        for process in (relay, tracker):
            if process.process is not None:
                process.stop()
        relay_out, tracker_out = relay.output(), tracker.output()
    assert sample(text, "inflight_messages_total", project=PROJECT, outcome="queued") == 3
    assert sample(text, "inflight_tracker_hits_total", kind="open") == 1  # counted by the tracker process
    relay_lines = [json.loads(line) for line in relay_out.splitlines() if line.startswith("{")]
    assert [e.get("event") for e in relay_lines].count("auth-without-tls") == 1
    assert sum(1 for e in relay_lines if e.get("outcome") == "queued" and e.get("project") == PROJECT) == 3
    assert "Requiring AUTH" not in relay_out and "auth_require_tls" not in relay_out and PROJECT_SECRET not in relay_out
    access = [json.loads(line) for line in tracker_out.splitlines() if '"logger": "inflight.access"' in line]
    pixel_line = next(e for e in access if e["path"].startswith("/o/"))
    assert pixel_line["status"] == "200" and pixel_line["path"].endswith("…") and len(pixel_line["path"]) == 12


def test_grafana_dashboard_reads_only_metrics_that_exist() -> None:
    from prometheus_client import REGISTRY

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "inflight.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"inflight_\w+", target["expr"])}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {metric.name + suffix for metric in REGISTRY.collect() if metric.name.startswith("inflight_")
                for suffix in suffixes[metric.type]}
    assert used and used <= exported, used - exported


def test_spool_depth_and_age_are_exported_while_the_store_is_away(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url)
    with RunningService(settings) as running:
        send(running.smtp_port, html_message({"X-Inflight-Template-Type": "MARKETING"}))
        pixel = next(u for u in tracked_urls(sink.messages[0].data) if "/o/" in u)
        lock = sqlite3.connect(sqlite_path(settings.store.url), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the store is away: the hit waits in the spool
        try:
            assert fetch(running, pixel).status_code == 200
            waiting = poll_metrics(running.http_base, lambda text: sample(text, "inflight_spool_depth") >= 1)
            assert sample(waiting, "inflight_spool_oldest_seconds") > 0
            health = httpx.get(f"{running.http_base}/healthz", timeout=5)  # answers, and says the store is away
            assert health.status_code == 503 and health.json()["store"] == "unreachable"
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        drained = poll_metrics(running.http_base, lambda text: sample(text, "inflight_spool_depth") == 0)
    assert sample(drained, "inflight_spool_oldest_seconds") == 0


def poll_metrics(base: str, done: Callable[[str], bool], *, seconds: float = 30.0, every: float = 0.2) -> str:
    """The first /metrics text `done` accepts (the gauges are refreshed every few seconds)."""
    return wait_for(lambda: text if done(text := httpx.get(f"{base}/metrics").text) else "", seconds=seconds,
                    what=f"/metrics of {base}", every=every)
