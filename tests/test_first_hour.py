"""The first hour of a new user, one trap each: what used to be accepted silently is now refused or said."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from config.settings import ConfigError, settings_from_mapping
from inflight.cli import main
from relay.upstream import OutboxUpstream
from store import open_store
from store.model import NewEvent, rfc3339
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, make_settings
from tests.processes import Inflight
from tests.test_flow import html_message, send

START = datetime(2026, 3, 1, 10, tzinfo=UTC)
VALID = {"projects": [{"id": "p", "secret": "secret-123"}]}


def problems(raw: dict, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping(raw, environ)
    return error.value.problems


def test_two_projects_with_one_secret_are_refused_naming_both() -> None:
    found = problems({"projects": [{"id": "shop", "secret": "same-secret-1"}, {"id": "blog", "secret": "same-secret-1"}]}, {})
    assert found == ["projects[1].secret: project 'blog' has the same secret as project 'shop' (projects[0]); "
                     "give each project its own"]
    assert "same-secret-1" not in "".join(found)


def test_an_unknown_inflight_variable_is_refused_like_a_toml_typo(tmp_path: Path) -> None:
    found = problems(VALID, {"INFLIGHT_RELAY_MAX_RECIPIENT": "7", "INFLIGHT_REALY_LISTEN": "0.0.0.0:25"})
    assert found == ["INFLIGHT_REALY_LISTEN: unknown environment variable (did you mean INFLIGHT_RELAY_LISTEN?)",
                     "INFLIGHT_RELAY_MAX_RECIPIENT: unknown environment variable (did you mean INFLIGHT_RELAY_MAX_RECIPIENTS?)"]
    (tmp_path / "url").write_text("smtp://mx.example.com:587\n")
    # The config path, the suite's switches and every key's variable (a secret's _FILE too) are known.
    settings_from_mapping(VALID, {"INFLIGHT_CONFIG": "x.toml", "INFLIGHT_REQUIRE_PG": "1", "INFLIGHT_CORPUS": "/c",
                                  "INFLIGHT_NETDATA": "/n", "INFLIGHT_TEST_PG_URL": "postgresql://x",
                                  "INFLIGHT_BENCH_PG_URL": "postgresql://y", "INFLIGHT_RELAY_MAX_RECIPIENTS": "7",
                                  "INFLIGHT_UPSTREAM_URL_FILE": str(tmp_path / "url"), "OTHER_THING": "x"})


def test_relay_hostname_defaults_to_the_machine_fqdn() -> None:
    settings = settings_from_mapping(VALID, {})
    assert settings.relay.hostname == socket.getfqdn() != "relay.example.com"
    assert settings_from_mapping({**VALID, "relay": {"hostname": "mx.example.org"}}, {}).relay.hostname == "mx.example.org"


@pytest.mark.parametrize("address", ["", "  ", "a@", "@example.com", "a b@example.com", "a@example..com", "a\n@x.com"])
def test_contacts_forget_refuses_an_empty_or_malformed_address(tmp_path: Path, address: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n[[projects]]\nid = "p"\nsecret = "demo-secret"\n')
    assert main(["contacts", "forget", address, "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.db").exists()  # refused before the store was touched
    assert main(["contacts", "forget", "crm-42", "--config", str(config)]) == 0  # a contact id is not an address


def test_outbox_files_are_named_by_message_id_and_recipient_and_keep_the_envelope(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"outbox:///{tmp_path}/outbox")
    message = html_message({"X-Inflight-Template-Type": "MARKETING"})
    message["Message-ID"] = "<spring/1@app.example.com>"
    with RunningService(settings) as service:
        send(service.smtp_port, message, ["a@example.com", "B@example.com"])
    files = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert files == ["spring_1@app.example.com.B@example.com.eml", "spring_1@app.example.com.a@example.com.eml"]
    copies = {}
    for name in files:
        parsed = email.message_from_bytes((tmp_path / "outbox" / name).read_bytes(), policy=email.policy.default)
        assert parsed["Return-Path"] == "<app@example.com>"
        copies[parsed["Delivered-To"]] = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert set(copies) == {"a@example.com", "B@example.com"}
    assert copies["a@example.com"] != copies["B@example.com"]  # each copy its own tokens


def test_outbox_keeps_a_resend_beside_the_first_copy(tmp_path: Path) -> None:
    outbox = OutboxUpstream(tmp_path)
    data = b"Message-ID: <m1@x>\r\nSubject: s\r\n\r\nbody\r\n"
    for _ in range(2):
        assert asyncio.run(outbox.send("app@x.com", ["r@x.com"], data))["r@x.com"].code == 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1@x.r@x.com.1.eml", "m1@x.r@x.com.eml"]
    assert (tmp_path / "m1@x.r@x.com.eml").read_bytes() == b"Return-Path: <app@x.com>\r\nDelivered-To: r@x.com\r\n" + data


def _event(n: int, contact: str) -> NewEvent:
    return NewEvent(name="email.sent", project=PROJECT, contact=contact, recipient=contact, message_id=f"m{n}",
                    at=rfc3339(START + timedelta(seconds=n // 2)), tracked=True)  # pairs share a time: ties by id


def test_events_pages_past_one_thousand_and_match_addresses_in_any_case(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"outbox:///{tmp_path}/outbox")

    async def seed() -> None:
        store = open_store(settings.store.url)
        await store.open()
        try:
            await store.record([_event(n, "b@example.com" if n % 2 else "crm-Id") for n in range(2500)])
            await store.record([replace(_event(9999, "Mixed@example.com"), at="2026-03-02T00:00:00.000000Z")])
        finally:
            await store.close()

    asyncio.run(seed())
    auth = {"Authorization": f"Bearer {PROJECT_SECRET}"}
    with RunningService(settings) as service, httpx.Client(base_url=service.http_base, headers=auth) as client:
        seen: list[int] = []
        params: dict[str, str] = {"limit": "1000"}
        pages = 0
        while True:
            body = client.get("/v1/events", params=params).json()
            pages += 1
            seen += [event["id"] for event in body["events"]]
            if body["next"] is None:
                break
            params = {"limit": "1000", "cursor": body["next"]}
        assert pages == 3 and len(seen) == len(set(seen)) == 2501
        assert seen == sorted(seen, reverse=True)  # newest first, nothing skipped or repeated across pages
        assert client.get("/v1/events", params={"limit": "5", "cursor": "bogus!"}).status_code == 422

        assert len(client.get("/v1/events", params={"contact": "B@Example.COM", "limit": "1000"}).json()["events"]) == 1000
        assert len(client.get("/v1/events", params={"contact": "mixed@EXAMPLE.com"}).json()["events"]) == 0
        assert len(client.get("/v1/events", params={"contact": "Mixed@EXAMPLE.com"}).json()["events"]) == 1
        assert len(client.get("/v1/events", params={"contact": "CRM-ID"}).json()["events"]) == 0  # ids: as given or lower
        assert len(client.get("/v1/events", params={"contact": "crm-Id", "limit": "1000"}).json()["next"]) > 0


def test_check_config_warns_about_a_stored_mode_and_reset_returns_to_the_toml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n[[projects]]\nid = "{PROJECT}"\n'
                      f'secret = "{PROJECT_SECRET}"\ntracking = "ENABLED"\n')
    assert main(["settings", "tracking", PROJECT, "DISABLED", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["check-config", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: project '{PROJECT}': tracking mode DISABLED was set at runtime and wins over tracking = "
            f"'ENABLED' in the TOML; `inflight settings tracking {PROJECT} --reset` returns to the TOML value") in err
    assert main(["settings", "tracking", PROJECT, "--reset", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "ENABLED"
    assert main(["check-config", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["settings", "tracking", PROJECT, "DISABLED", "--reset", "--config", str(config)]) == 2


def test_netdata_refresh_offline_names_the_url_and_keeps_nothing_and_check_config_suggests_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # a port nobody listens on: connection refused, as offline
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/egress-ip-ranges.csv"
    config = tmp_path / "inflight.toml"
    config.write_text(f"""
[tracker]
secrets = ["cli-secret-123"]
network_lists = [{{ agent = "apple_mpp", path = "{tmp_path}/apple.txt", upstream = ["{url}"] }}]
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[[projects]]
id = "demo"
secret = "demo-secret"
""")
    assert main(["check-config", "--config", str(config)]) == 0
    assert (f"warning: tracker.network_lists[0] (apple): {tmp_path}/apple.txt is missing, so its apple_mpp networks "
            f"are not recognised; run `inflight netdata refresh --config {config}`") in capsys.readouterr().err
    assert main(["netdata", "refresh", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"failed  apple: {url}: download failed:" in err
    assert f"(nothing was kept: {tmp_path}/apple.txt does not exist yet)" in err and "kept /" not in err


def test_start_up_suggests_netdata_refresh_for_a_missing_list(tmp_path: Path) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f"""
[tracker]
listen = "127.0.0.1:0"
workers = 1
secrets = ["cli-secret-123"]
network_lists = [{{ agent = "apple_mpp", path = "{tmp_path}/apple.txt", upstream = ["http://127.0.0.1:9/x"] }}]
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[[projects]]
id = "demo"
secret = "demo-secret"
""")
    tracker = Inflight("tracker", config, tmp_path / "tracker.log")
    try:
        tracker.start()  # the warning comes before the tracker listens
    finally:
        if tracker.process is not None:
            tracker.stop(15)
    lines = tracker.output().splitlines()
    assert any("missing: no addresses loaded; run `inflight netdata refresh`" in line for line in lines), lines
