from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import (
    ConfigError,
    TrackingEngine,
    TrackingMode,
    UpstreamSettings,
    load_settings,
    resolve_config_path,
    settings_from_mapping,
)
from tests.processes import ROOT

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


@pytest.mark.parametrize(("engine", "tracking_set", "quiet_set", "available"), [
    ("relay", "", "", "ENABLED DISABLED MARKETING_ONLY"),
    ("relay", "", "quiet", "ENABLED DISABLED MARKETING_ONLY"),
    ("relay", "track", "", "ENABLED"),  # untracked sends would get the provider's default set
    ("relay", "track", "quiet", "ENABLED DISABLED MARKETING_ONLY"),
    ("provider", "", "", ""),
    ("provider", "track", "", "ENABLED"),
    ("provider", "", "quiet", "DISABLED"),  # nothing could ever be tracked
    ("provider", "track", "quiet", "ENABLED DISABLED MARKETING_ONLY"),
])
def test_availability_rule(engine: str, tracking_set: str, quiet_set: str, available: str) -> None:
    raw = {"tracking_engine": engine, "configuration_set": tracking_set, "no_tracking_configuration_set": quiet_set}
    upstream = UpstreamSettings(**{**raw, "tracking_engine": TrackingEngine(engine)})
    assert " ".join(upstream.available_modes) == available
    for mode in TrackingMode:
        reason = upstream.unavailable(mode)
        assert (reason is None) is (mode.value in available.split())
        if reason is not None:
            assert upstream.missing_for(mode) in reason and reason.startswith(mode.value)


def test_unavailable_mode_fails_at_load_naming_project_and_key() -> None:
    found = problems({"upstream": {"tracking_engine": "provider", "configuration_set": "track"},
                      "projects": [{"id": "shop", "secret": "secret-123", "tracking": "MARKETING_ONLY"},
                                   {"id": "ok", "secret": "secret-456", "tracking": "ENABLED"}]})
    assert found == ['projects[0].tracking: project \'shop\': MARKETING_ONLY needs upstream.no_tracking_configuration_set '
                     'when tracking_engine = "provider"; set it, or choose one of ENABLED']
    [relay_found] = problems({"upstream": {"configuration_set": "track"},
                              "projects": [{"id": "shop", "secret": "secret-123", "tracking": "DISABLED"}]})
    assert "'shop'" in relay_found and "upstream.no_tracking_configuration_set" in relay_found
    assert "upstream.configuration_set is set" in relay_found


def test_engine_and_override_keys_are_validated() -> None:
    found = problems({"upstream": {"tracking_engine": "ses"},
                      "projects": [{"id": "p", "secret": "secret-123", "allow_tracking_override": "no"}]})
    assert any(p.startswith("upstream.tracking_engine: expected one of relay | provider") for p in found)
    assert any(p.startswith("projects[0].allow_tracking_override: expected true or false") for p in found)
    settings = settings_from_mapping(VALID, {"INFLIGHT_UPSTREAM_TRACKING_ENGINE": "provider",
                                             "INFLIGHT_UPSTREAM_CONFIGURATION_SET": "track"})
    assert settings.upstream.tracking_engine is TrackingEngine.PROVIDER
    assert settings.project("p").allow_tracking_override is True  # type: ignore[union-attr]


def test_check_config_and_start_refuse_an_unavailable_mode(tmp_path: Path) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f"""
[relay]
listen = "127.0.0.1:0"
[tracker]
listen = "127.0.0.1:0"
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[upstream]
tracking_engine = "provider"
configuration_set = "track"
[[projects]]
id = "shop"
secret = "secret-123"
tracking = "DISABLED"
""")
    for verb in ("check-config", "relay", "serve"):
        result = subprocess.run([sys.executable, "-m", "inflight.cli", verb, "--config", str(config)],
                                capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert result.returncode == 2, (verb, result.stderr)
        assert "'shop'" in result.stderr and "upstream.no_tracking_configuration_set" in result.stderr, verb
    assert not (tmp_path / "inflight.db").exists()  # refused before anything was opened
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


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "project").write_text("file-secret-123\n")
    (tmp_path / "hmac").write_text("new-hmac-key-1\n\nold-hmac-key-1\n")
    (tmp_path / "upstream").write_text("smtp://user:p%40ss@mx.example.com:587\n")
    (tmp_path / "store").write_text("postgresql://inflight:pg-pass-42@db:5432/inflight\n")
    settings = settings_from_mapping({
        "projects": [{"id": "p", "secret_file": str(tmp_path / "project")}],
        "tracker": {"secrets_file": str(tmp_path / "hmac")},
        "upstream": {"url_file": str(tmp_path / "upstream")},
        "store": {"url_file": str(tmp_path / "store")},
    }, {})
    assert settings.store.url == "postgresql://inflight:pg-pass-42@db:5432/inflight"
    assert "pg-pass-42" not in repr(settings)
    assert settings.projects[0].secret == "file-secret-123"
    assert settings.tracker.secrets == ("new-hmac-key-1", "old-hmac-key-1")
    assert settings.upstream.url == "smtp://user:p%40ss@mx.example.com:587"
    for secret in ("file-secret-123", "new-hmac-key-1", "p%40ss"):
        assert secret not in repr(settings)


def test_secret_files_from_the_environment_replace_the_config_value(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text("env-file-key-1\n")
    settings = settings_from_mapping({**VALID, "tracker": {"secrets": ["config-key-1"]}},
                                     {"INFLIGHT_TRACKER_SECRETS_FILE": str(tmp_path / "hmac")})
    assert settings.tracker.secrets == ("env-file-key-1",)
    settings = settings_from_mapping({**VALID, "upstream": {"url_file": str(tmp_path / "missing")}},
                                     {"INFLIGHT_UPSTREAM_URL": "smtp://u:envpass@mx.example.com"})
    assert settings.upstream.url == "smtp://u:envpass@mx.example.com"


def test_secret_file_problems_are_named_and_never_echo_a_secret(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("some-secret-1\n")
    found = problems({"projects": [{"id": "p", "secret": "inline-secret-1", "secret_file": str(tmp_path / "s")},
                                   {"id": "q", "secret_file": str(tmp_path / "missing")},
                                   {"id": "r", "secret": 12345678}],
                      "relay": {"bogus_file": "x"}})
    found += problems({**VALID, "upstream": {"url": "http://user:hunter2-secret@mx.example.com"}})
    found += problems({**VALID, "store": {"url": "mysql://user:hunter2-store@db/x"}})
    assert any(p.startswith("store.url: expected sqlite:///") and p.endswith("got scheme 'mysql'") for p in found)
    assert "projects[0].secret / projects[0].secret_file: give one or the other" in found
    assert any(p.startswith("projects[1].secret_file: cannot read") for p in found)
    assert "projects[2].secret: expected a string, got a value of type int" in found
    assert any(p.startswith("upstream.url: scheme must be one of") and p.endswith("got 'http'") for p in found)
    assert any(p.startswith("relay.bogus_file: unknown key") for p in found)
    text = "\n".join(found)
    assert "inline-secret-1" not in text and "12345678" not in text and "hunter2" not in text


def test_new_relay_and_project_keys_are_validated(tmp_path: Path) -> None:
    found = problems({"relay": {"smtps_listen": "465", "require_tls": True, "allow_plaintext_auth": True,
                                "auth_failures_per_ip": 0},
                      "projects": [{"id": "p", "secret": "secret-123", "sender_domains": ["exa mple.com"],
                                    "rate_limit_per_minute": -1}]})
    assert "relay.smtps_listen: needs relay.tls_cert and relay.tls_key (implicit TLS)" in found
    assert any(p.startswith("relay.smtps_listen: expected host:port") for p in found)
    assert "relay.require_tls: needs relay.tls_cert and relay.tls_key, or nobody could send" in found
    assert any(p.startswith("relay.require_tls / relay.allow_plaintext_auth") for p in found)
    assert "relay.auth_failures_per_ip: must be at least 1" in found
    assert any(p.startswith("projects[0].sender_domains: 'exa mple.com'") for p in found)
    assert "projects[0].rate_limit_per_minute: must be 0 (no project limit) or more" in found


def test_engagement_keys_are_typed_and_checked() -> None:
    hooked = {"id": "p", "secret": "secret-123", "webhook_url": "https://app.example.com/hooks",
              "webhook_secret": "0123456789abcdef", "ip_mode": "truncated", "retention_days": 30}
    settings = settings_from_mapping({"projects": [hooked], "webhooks": {"retry_initial_seconds": 1, "timeout_seconds": 2.5}},
                                     {"INFLIGHT_WEBHOOKS_POLL_SECONDS": "0.25"})
    [project] = settings.projects
    assert (project.ip_mode, project.retention_days) == ("truncated", 30)
    assert (settings.webhooks.retry_initial_seconds, settings.webhooks.timeout_seconds) == (1.0, 2.5)
    assert settings.webhooks.poll_seconds == 0.25
    found = problems({"projects": [{**hooked, "ip_mode": "partial", "retention_days": -1, "webhook_url": "ftp://x",
                                    "webhook_secret": "short"}],
                      "webhooks": {"retry_hours": 12, "timeout_seconds": "10"}})
    assert any(p.startswith("projects[0].ip_mode: expected one of full | truncated | none") for p in found)
    assert any(p.startswith("webhooks.timeout_seconds: expected a number") for p in found)
    found = problems({"projects": [{**hooked, "retention_days": -1, "webhook_url": "ftp://x", "webhook_secret": "short"}],
                      "webhooks": {"retry_hours": 12}})
    for key in ("retention_days", "webhook_url", "webhook_secret"):
        assert any(p.startswith(f"projects[0].{key}:") for p in found), key
    assert any(p.startswith("webhooks.retry_hours: must be at least 24") for p in found)
    lone = problems({"projects": [{"id": "p", "secret": "secret-123", "webhook_secret": "0123456789abcdef"}]})
    assert any(p.startswith("projects[0].webhook_secret: set webhook_url too") for p in lone)
    bad_whsec = problems({"projects": [{**hooked, "webhook_secret": "whsec_not*base64!!"}]})
    assert any("whsec_" in p for p in bad_whsec)


def test_delivery_keys_take_numbers_and_are_checked() -> None:
    settings = settings_from_mapping({**VALID, "upstream": {"connect_timeout_seconds": 2, "data_timeout_seconds": 0.5,
                                                            "fallback_urls": ["smtp://u:pw@backup.example:587"]}},
                                     {"INFLIGHT_UPSTREAM_SEND_TIMEOUT_SECONDS": "7.5", "INFLIGHT_RELAY_DRAIN_TIMEOUT_SECONDS": "3"})
    assert settings.upstream.connect_timeout_seconds == 2.0 and settings.upstream.data_timeout_seconds == 0.5
    assert settings.upstream.send_timeout_seconds == 7.5 and settings.relay.drain_timeout_seconds == 3.0
    assert "pw" not in repr(settings.upstream)
    assert any(p.startswith("upstream.ledger_ttl_hours: expected an integer")
               for p in problems({**VALID, "upstream": {"ledger_ttl_hours": "1"}}))
    found = problems({**VALID, "upstream": {"command_timeout_seconds": 0, "pool_size": 0, "fallback_urls": ["http://u:hunter2@x"]},
                      "relay": {"drain_timeout_seconds": -1, "cpu_workers": 0}})
    assert "upstream.command_timeout_seconds: must be a positive number of seconds" in found
    assert "upstream.pool_size: must be at least 1" in found and "relay.cpu_workers: must be at least 1" in found
    assert "relay.drain_timeout_seconds: must be zero or more seconds" in found
    assert any(p.startswith("upstream.fallback_urls: scheme must be one of") for p in found)
    assert not any("hunter2" in p for p in found)
