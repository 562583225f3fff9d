"""Per-project API keys: a read key reads and cannot change settings, an admin key can, the secret still works."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from config.settings import ConfigError, settings_from_mapping
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, make_settings

READ_KEY = "read-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"


def test_read_and_admin_keys_and_the_secret(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"outbox:///{tmp_path}/outbox", projects=[{
        "id": PROJECT, "secret": PROJECT_SECRET,
        "api_keys": [{"key": READ_KEY}, {"key": ADMIN_KEY, "access": "admin"}]}])
    assert READ_KEY not in repr(settings)
    with RunningService(settings) as running, httpx.Client(base_url=running.http_base) as client:
        def call(token: str, method: str = "GET", path: str = "/v1/settings/tracking") -> httpx.Response:
            body = {"json": {"mode": "DISABLED"}} if method == "PUT" else {}
            return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **body)  # type: ignore[arg-type]

        assert [call(t, path=p).status_code for t in (READ_KEY, ADMIN_KEY, PROJECT_SECRET)
                for p in ("/v1/events", "/v1/stats", "/v1/settings/tracking")] == [200] * 9
        refused = call(READ_KEY, "PUT")
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        assert call(READ_KEY).json()["mode"] == "ENABLED"
        assert call(ADMIN_KEY, "PUT").json()["mode"] == "DISABLED"
        assert call("read-key-01234567890", "GET").status_code == 401
        for token, status in ((READ_KEY, 403), (ADMIN_KEY, 201)):  # the other changing routes need admin too
            added = client.post("/v1/suppressions", json={"address": "x@example.com"},
                                headers={"Authorization": f"Bearer {token}"})
            assert added.status_code == status, added.text


def problems(projects: list[dict]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"projects": projects}, {})
    return error.value.problems


def test_keys_are_long_and_name_one_project() -> None:
    found = problems([{"id": "a", "secret": "secret-aaa", "api_keys": [{"key": "short"}, {"key": "k" * 20}]},
                      {"id": "b", "secret": "secret-bbb", "api_keys": [{"key": "k" * 20, "access": "admin"}]}])
    assert found == ["projects[0].api_keys[0].key: use at least 16 characters (e.g. openssl rand -hex 24)",
                     "projects[1].api_keys[0].key: the same token as another key or secret (of project 'a'); "
                     "every token must name one project and one access"]
    [wrong] = problems([{"id": "a", "secret": "secret-aaa", "api_keys": [{"key": "k" * 20, "access": "owner"}]}])
    assert wrong == "projects[0].api_keys[0].access: expected one of read | admin, got 'owner'"
