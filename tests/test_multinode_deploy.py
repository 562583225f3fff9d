"""docker-compose.yml: PostgreSQL plus relay and tracker replicas. No Docker engine runs here, so the file is
checked by the compose client where one is installed, its shape is checked always, and its healthchecks
run against real `inflight` processes (the same topology as processes: tests/test_multinode.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import RelaySettings
from tests.cluster import cluster, cluster_config
from tests.processes import ROOT
from tests.upstreams import faulty_sink

COMPOSE = ROOT / "docker-compose.yml"


def compose_client() -> list[str] | None:
    """`docker compose` (the v2 plugin) or the standalone `docker-compose`, whichever works here."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def seconds(duration: str) -> float:
    """A compose duration such as `40s`, `1m30s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_the_compose_client_accepts_the_file() -> None:
    client = compose_client()
    if client is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install docker-compose)")
    checked = subprocess.run([*client, "--file", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    assert set(resolved["services"]) == {"postgres", "relay", "tracker"}
    assert {resolved["services"][name]["image"] for name in ("relay", "tracker")} == {"inflight:local"}


def test_postgres_is_the_official_image_with_a_readiness_check_and_a_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:15(\.\d+)?", postgres["image"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    [volume] = postgres["volumes"]
    assert volume.split(":")[0] in compose["volumes"] and volume.endswith(":/var/lib/postgresql/data")
    assert "POSTGRES_PASSWORD" not in postgres["environment"]  # the password comes from a secret file


def test_relay_and_tracker_are_one_image_in_several_replicas_on_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    relay, tracker = services["relay"], services["tracker"]
    assert relay["image"] == tracker["image"] and relay["build"] == tracker["build"] == "."
    for service in (relay, tracker):
        assert service["deploy"]["replicas"] >= 2
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["environment"]["INFLIGHT_STORE_URL_FILE"] == "/run/secrets/inflight-store-url"
        assert "inflight-store-url" in service["secrets"]
        assert service["healthcheck"]["test"][0] == "CMD"
        # SIGKILL only after the drain: a message in flight gets its 250 before the container dies.
        assert seconds(service["stop_grace_period"]) > RelaySettings.drain_timeout_seconds + 5
    targets = {port.rsplit(":", 1)[1] for port in relay["ports"]}
    assert targets == {"587", "465"}
    assert relay["environment"]["INFLIGHT_RELAY_SMTPS_LISTEN"].endswith(":465")
    assert set(compose["secrets"]) == {"postgres-password", "inflight-store-url"}


def healthcheck(service: dict[str, Any], port: int, container_port: int) -> list[str]:
    """The service's healthcheck command, run here against a process listening on `port`."""
    kind, program, *args = service["healthcheck"]["test"]
    assert kind == "CMD" and program == "python"
    return [sys.executable, *(arg.replace(str(container_port), str(port)) for arg in args)]


def test_the_healthchecks_pass_on_live_nodes_and_fail_once_they_stop(tmp_path: Path, compose: dict[str, Any]) -> None:
    services = compose["services"]
    with faulty_sink() as sink:
        config = cluster_config(tmp_path / "inflight.toml", store_url=f"sqlite:///{tmp_path}/inflight.db",
                                upstream_url=sink.url)
        with cluster(tmp_path, config, relays=1, trackers=1) as nodes:
            checks = [healthcheck(services["relay"], nodes.relays[0].port, 587),
                      healthcheck(services["tracker"], nodes.trackers[0].port, 8080)]
            for check in checks:
                done = subprocess.run(check, capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stderr
            for node in nodes.nodes():
                node.stop()
        for check in checks:
            assert subprocess.run(check, capture_output=True, timeout=30).returncode != 0
