from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings, resolve_config_path, settings_from_mapping

ROOT = Path(__file__).resolve().parents[1]
VALID = {"projects": [{"id": "p", "secret": "secret-123"}]}


def problems(raw: dict, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping(raw, environ or {})
    return error.value.problems


def test_shipped_configs_are_valid() -> None:
    dev = load_settings(ROOT / "config" / "dev.toml", {})
    assert dev.relay.listen == "127.0.0.1:2525" and dev.tracker.listen == "127.0.0.1:8080"
    assert dev.project("demo") is not None


def test_unknown_keys_and_sections_are_named() -> None:
    found = problems({**VALID, "relay": {"alow_plaintext_auth": True}, "trackr": {}})
    assert any(p.startswith("relay.alow_plaintext_auth: unknown key") for p in found)
    assert any(p.startswith("trackr: unknown section") for p in found)


def test_wrong_types_and_values_name_the_key_and_the_fix() -> None:
    found = problems({"relay": {"max_recipients": "50", "listen": "nowhere"},
                      "projects": [{"id": "p", "secret": "secret-123", "tracking": "SOMETIMES"}]})
    assert any(p.startswith("relay.max_recipients: expected an integer") for p in found)
    assert any("ENABLED | DISABLED | MARKETING_ONLY" in p and p.startswith("projects[0].tracking") for p in found)
    found = problems({**VALID, "relay": {"listen": "nowhere"}, "upstream": {"url": "http://x"}})
    assert any(p.startswith("relay.listen: expected host:port") for p in found)
    assert any(p.startswith("upstream.url: scheme must be one of") for p in found)


def test_projects_are_required_and_need_a_secret() -> None:
    assert any(p.startswith("projects: define at least one") for p in problems({}))
    assert any(p.startswith("projects[0].secret: required") for p in problems({"projects": [{"id": "p"}]}))


def test_environment_overrides_scalars() -> None:
    settings = settings_from_mapping(VALID, {"INFLIGHT_UPSTREAM_URL": "smtp://mx.example.com:587",
                                             "INFLIGHT_RELAY_MAX_RECIPIENTS": "7",
                                             "INFLIGHT_RELAY_ALLOW_PLAINTEXT_AUTH": "true",
                                             "INFLIGHT_TRACKER_SECRETS": "new-key-123,old-key-123"})
    assert settings.upstream.url == "smtp://mx.example.com:587"
    assert settings.relay.max_recipients == 7 and settings.relay.allow_plaintext_auth is True
    assert settings.tracker.secrets == ("new-key-123", "old-key-123")
    assert any(p.startswith("relay.max_recipients: INFLIGHT_RELAY_MAX_RECIPIENTS")
               for p in problems(VALID, {"INFLIGHT_RELAY_MAX_RECIPIENTS": "many"}))


def test_config_path_resolution_order() -> None:
    assert resolve_config_path("a.toml", {"INFLIGHT_CONFIG": "b.toml"}) == Path("a.toml")
    assert resolve_config_path(None, {"INFLIGHT_CONFIG": "b.toml"}) == Path("b.toml")
    assert resolve_config_path(None, {}) == Path("config/dev.toml")


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "inflight.cli", "check-config", "--config", str(ROOT / "config" / "dev.toml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\nmax_recipients = "x"\nbogus = 1\n')
    failed = subprocess.run([sys.executable, "-m", "inflight.cli", "check-config", "--config", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode != 0
    lines = failed.stderr.strip().splitlines()
    assert any("relay.max_recipients" in line for line in lines)
    assert any("relay.bogus" in line for line in lines)
    assert any("projects" in line for line in lines)


def test_network_lists_and_agent_keys() -> None:
    settings = settings_from_mapping({
        **VALID,
        "tracker": {
            "sent_window_seconds": 2.5,
            "network_lists": [
                {"agent": "apple_mpp", "path": "var/netdata/apple-private-relay.txt"},
                {"agent": "scanner", "path": "gw.txt", "name": "gateways", "upstream": ["https://lists.example/gw.txt"]},
            ],
        },
        "projects": [{"id": "p", "secret": "secret-123", "honeypot_link": True}],
    }, {})
    first, second = settings.tracker.network_lists
    assert (first.list_name, first.agent, first.upstream) == ("apple-private-relay", "apple_mpp", ())
    assert (second.list_name, second.upstream) == ("gateways", ("https://lists.example/gw.txt",))
    assert settings.tracker.sent_window_seconds == 2.5 and settings.projects[0].honeypot_link is True
    assert settings_from_mapping(VALID, {}).tracker.network_lists == ()


def test_network_list_problems_name_the_key() -> None:
    found = problems({
        **VALID,
        "tracker": {
            "sent_window_seconds": "soon",
            "network_lists": [{"agent": "scanner", "path": "a.txt"}, {"clas": "scanner", "path": "b.txt"}, "c.txt"],
        },
    })
    assert any(p.startswith("tracker.sent_window_seconds: expected a number") for p in found)
    assert any(p.startswith("tracker.network_lists[1].clas: unknown key") for p in found)
    assert any(p.startswith("tracker.network_lists[1].agent: required key is missing") for p in found)
    assert any(p.startswith("tracker.network_lists[2]: must be a table") for p in found)
    found = problems({**VALID, "tracker": {"sent_window_seconds": -1, "network_lists": [
        {"agent": "robot", "path": "a.txt"}, {"agent": "scanner", "path": "x/a.txt", "upstream": ["ftp://x"]},
    ]}})
    assert any(p.startswith("tracker.network_lists[0].agent: expected one of apple_mpp | image_proxy | scanner") for p in found)
    assert any(p.startswith("tracker.sent_window_seconds: expected 0 to 3600") for p in found)
    assert any(p.startswith("tracker.network_lists[1].name: duplicate list name 'a'") for p in found)
    assert any(p.startswith("tracker.network_lists[1].upstream: expected http(s) URLs") for p in found)
    assert problems({**VALID, "projects": [{"id": "p", "secret": "secret-123", "honeypot_link": "yes"}]}) == [
        "projects[0].honeypot_link: expected true or false, got 'yes'"
    ]
