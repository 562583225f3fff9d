"""Settings → Tracking at runtime: the store wins over TOML once set, the API and the CLI twin, across processes."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.settings import ConfigError, Settings
from config.tracking import ModeRefused, TrackingSettings
from inflight.cli import main
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.processes import ROOT, Inflight, write_config
from tests.test_flow import html_message, send, tracked_urls

MARKETING = {"X-Inflight-Template-Type": "MARKETING"}
SETS = {"configuration_set": "track", "no_tracking_configuration_set": "quiet"}


def project_settings(tmp_path: Path, sink_url: str = "outbox:///unused", tracking: str = "ENABLED", **upstream: str) -> Settings:
    return make_settings(tmp_path, sink_url, upstream=upstream,
                         projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": tracking},
                                   {"id": "other", "secret": "other-secret", "tracking": "ENABLED"}])


def with_tracking(settings: Settings, action: Any) -> Any:
    async def run() -> Any:
        async with TrackingSettings.opened(settings) as tracking:
            return await action(tracking)

    return asyncio.run(run())


def current_mode(settings: Settings, project: str = PROJECT) -> str:
    return str(with_tracking(settings, lambda t: t.mode(settings.project(project))).value)


def test_toml_is_the_default_and_the_store_wins_once_set(tmp_path: Path) -> None:
    settings = project_settings(tmp_path, tracking="MARKETING_ONLY")
    assert current_mode(settings) == "MARKETING_ONLY"
    view = with_tracking(settings, lambda t: t.change(settings.project(PROJECT), "DISABLED", by="test"))
    assert view == {"mode": "DISABLED", "available_modes": ["ENABLED", "DISABLED", "MARKETING_ONLY"],
                    "allow_tracking_override": True, "engine": "relay"}
    # A restart with an edited TOML value: the stored choice still wins, other projects are untouched.
    edited = project_settings(tmp_path, tracking="ENABLED")
    assert current_mode(edited) == "DISABLED"
    assert current_mode(edited, "other") == "ENABLED"


@pytest.mark.parametrize(("value", "status", "fragment"), [
    ("SOMETIMES", 422, "expected one of ENABLED, DISABLED, MARKETING_ONLY"),
    ("enabled", 422, "expected one of"),
    (3, 422, "expected one of"),
    ("MARKETING_ONLY", 409, "upstream.no_tracking_configuration_set"),
])
def test_refused_changes_name_the_problem_and_store_nothing(tmp_path: Path, value: object, status: int, fragment: str) -> None:
    settings = project_settings(tmp_path, configuration_set="track")
    with pytest.raises(ModeRefused) as refused:
        with_tracking(settings, lambda t: t.change(settings.project(PROJECT), value, by="test"))
    assert refused.value.status == status and fragment in str(refused.value)
    assert current_mode(settings) == "ENABLED"


def test_a_stored_mode_the_upstream_no_longer_allows_stops_start(tmp_path: Path, sink: Sink) -> None:
    settings = project_settings(tmp_path, sink.url, **SETS)
    with_tracking(settings, lambda t: t.change(settings.project(PROJECT), "MARKETING_ONLY", by="test"))
    without_quiet_set = project_settings(tmp_path, sink.url, configuration_set="track")
    assert with_tracking(without_quiet_set, lambda t: t.problems()) != []
    with pytest.raises(ConfigError) as refused, RunningService(without_quiet_set):
        pass
    [problem] = refused.value.problems
    assert f"project {PROJECT!r}" in problem and "upstream.no_tracking_configuration_set" in problem
    assert f"inflight settings tracking {PROJECT} MODE" in problem


def test_an_unreadable_stored_mode_defers_instead_of_guessing(tmp_path: Path, sink: Sink) -> None:
    message = html_message({**MARKETING, "Message-ID": "<deferred@app.example>"})
    with RunningService(project_settings(tmp_path, sink.url)) as service:
        with sqlite3.connect(tmp_path / "inflight.db") as db:  # e.g. a hand edit while running
            db.execute("INSERT INTO tracking_settings VALUES (?, 'SOMETIMES', '')", (PROJECT,))
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            send(service.smtp_port, message)
        assert deferred.value.smtp_code == 451 and b"4.3.0" in deferred.value.smtp_error
        assert sink.messages == []
        # The ledger claim made while the mode was read was given back: the app's retry goes at once,
        # not after "another attempt is being sent" until the claim expired.
        with sqlite3.connect(tmp_path / "inflight.db") as db:
            db.execute("UPDATE tracking_settings SET mode = 'DISABLED' WHERE project = ?", (PROJECT,))
        assert send(service.smtp_port, message) == {}
        assert len(sink.messages) == 1 and not tracked_urls(sink.messages[0].data)


# The HTTP API, with the relay in the same process.

def api(service: RunningService, method: str = "GET", body: Any = None, secret: str = PROJECT_SECRET) -> httpx.Response:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    return httpx.request(method, f"{service.http_base}/v1/settings/tracking", content=content,
                         headers={"Authorization": f"Bearer {secret}"})


def test_api_change_applies_to_the_next_message(tmp_path: Path, sink: Sink) -> None:
    with RunningService(project_settings(tmp_path, sink.url)) as service:
        assert api(service).json() == {"mode": "ENABLED", "available_modes": ["ENABLED", "DISABLED", "MARKETING_ONLY"],
                                       "allow_tracking_override": True, "engine": "relay"}
        send(service.smtp_port, html_message(MARKETING))
        changed = api(service, "PUT", {"mode": "DISABLED"})
        assert changed.status_code == 200 and changed.json()["mode"] == "DISABLED"
        send(service.smtp_port, html_message(MARKETING))
        assert api(service, "PUT", {"mode": "MARKETING_ONLY"}).status_code == 200
        send(service.smtp_port, html_message(MARKETING))
        send(service.smtp_port, html_message({"X-Inflight-Template-Type": "TRANSACTIONAL"}))
        assert [bool(tracked_urls(m.data)) for m in sink.messages] == [True, False, True, False]
        assert api(service, secret="other-secret").json()["mode"] == "ENABLED"  # per project
    with RunningService(project_settings(tmp_path, sink.url)) as restarted:
        assert api(restarted).json()["mode"] == "MARKETING_ONLY"  # survives a restart


def test_api_refusals(tmp_path: Path, sink: Sink) -> None:
    with RunningService(project_settings(tmp_path, sink.url, configuration_set="track")) as service:
        assert api(service).json()["available_modes"] == ["ENABLED"]
        unknown = api(service, "PUT", {"mode": "SOMETIMES"})
        assert unknown.status_code == 422
        assert unknown.json()["allowed"] == ["ENABLED", "DISABLED", "MARKETING_ONLY"]
        assert "ENABLED, DISABLED, MARKETING_ONLY" in unknown.json()["error"]
        unavailable = api(service, "PUT", {"mode": "DISABLED"})
        assert unavailable.status_code == 409
        assert unavailable.json()["missing"] == "upstream.no_tracking_configuration_set"
        assert "upstream.no_tracking_configuration_set" in unavailable.json()["error"]
        for body in (b"not json", [], {"mode": "DISABLED", "allow_tracking_override": False}, {}):
            assert api(service, "PUT", body).status_code == 422, body
        assert api(service, "PUT", {"mode": "ENABLED"}, secret="wrong-secret").status_code == 401
        assert httpx.get(f"{service.http_base}/v1/settings/tracking").status_code == 401
        assert api(service).json()["mode"] == "ENABLED"
        send(service.smtp_port, html_message(MARKETING))
        assert tracked_urls(sink.messages[0].data)


def test_provider_engine_view(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, upstream={"tracking_engine": "provider", **SETS},
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "allow_tracking_override": False}])
    with RunningService(settings) as service:
        assert api(service).json() == {"mode": "ENABLED", "available_modes": ["ENABLED", "DISABLED", "MARKETING_ONLY"],
                                       "allow_tracking_override": False, "engine": "provider"}


# Across processes: `inflight relay` and the tracker (or the CLI) on one SQLite file.

def test_relay_process_sees_a_change_made_through_the_tracker_process(tmp_path: Path, sink: Sink) -> None:
    relay = Inflight("relay", write_config(tmp_path / "inflight.toml", sink.url), tmp_path / "relay.log").start()
    try:
        with RunningService(make_settings(tmp_path, sink.url), relay=False) as tracker:
            send(relay.smtp_port, html_message(MARKETING))
            assert api(tracker, "PUT", {"mode": "DISABLED"}).status_code == 200
            send(relay.smtp_port, html_message(MARKETING))
            assert api(tracker, "PUT", {"mode": "ENABLED"}).status_code == 200
            send(relay.smtp_port, html_message(MARKETING))
    finally:
        relay.stop(15)
    assert [bool(tracked_urls(m.data)) for m in sink.messages] == [True, False, True]


def test_cli_twin_changes_a_running_service(tmp_path: Path, sink: Sink) -> None:
    config = write_config(tmp_path / "inflight.toml", sink.url)
    with RunningService(make_settings(tmp_path, sink.url)) as service:
        send(service.smtp_port, html_message(MARKETING))
        result = subprocess.run([sys.executable, "-m", "inflight.cli", "settings", "tracking", PROJECT, "DISABLED",
                                 "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["mode"] == "DISABLED"
        send(service.smtp_port, html_message(MARKETING))
        assert api(service).json()["mode"] == "DISABLED"
    assert [bool(tracked_urls(m.data)) for m in sink.messages] == [True, False]


def test_cli_twin_prints_sets_and_validates_like_the_api(tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "inflight.toml", sink.url)
    assert main(["settings", "tracking", PROJECT, "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "mode": "ENABLED", "available_modes": ["ENABLED", "DISABLED", "MARKETING_ONLY"],
        "allow_tracking_override": True, "engine": "relay"}
    assert main(["settings", "tracking", PROJECT, "MARKETING_ONLY", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "MARKETING_ONLY"
    assert main(["settings", "tracking", PROJECT, "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "MARKETING_ONLY"

    assert main(["settings", "tracking", PROJECT, "SOMETIMES", "--config", str(config)]) == 2
    assert "ENABLED, DISABLED, MARKETING_ONLY" in capsys.readouterr().err
    assert main(["settings", "tracking", "nobody", "--config", str(config)]) == 2
    assert f"known: {PROJECT}" in capsys.readouterr().err

    config.write_text(config.read_text().replace('[upstream]\n', '[upstream]\nconfiguration_set = "track"\n'))
    # The stored MARKETING_ONLY is now unavailable: check-config says so, and only an available mode can be set.
    with pytest.raises(SystemExit):
        main(["check-config", "--config", str(config)])
    assert "upstream.no_tracking_configuration_set" in capsys.readouterr().err
    assert main(["settings", "tracking", PROJECT, "DISABLED", "--config", str(config)]) == 1
    assert "upstream.no_tracking_configuration_set" in capsys.readouterr().err
    assert main(["settings", "tracking", PROJECT, "ENABLED", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["check-config", "--config", str(config)]) == 0
